"""The one exception type users see: a single line that names the file, key or line at fault."""

import os
import sys
from collections.abc import Callable


class AquilaError(Exception):
    """Bad input or state. The CLI prints `error: <message>` and exits with status 2."""

    def __init__(self, message: str) -> None:
        # Keep messages to one line so logs and terminals show them whole.
        super().__init__(" ".join(str(message).split()))


def run_command(body: Callable[[], int | None]) -> int:
    """Run a command's body: an AquilaError becomes `error: <message>` on stderr and status 2; Ctrl-C is 130.
    Under torchrun only rank 0 prints, so N processes do not repeat the same line."""
    try:
        return int(body() or 0)
    except AquilaError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
