"""The one exception type users see: a single line that names the file, key or line at fault."""


class AquilaError(Exception):
    """Bad input or state. The CLI prints `error: <message>` and exits with status 2."""

    def __init__(self, message: str) -> None:
        # Keep messages to one line so logs and terminals show them whole.
        super().__init__(" ".join(str(message).split()))
