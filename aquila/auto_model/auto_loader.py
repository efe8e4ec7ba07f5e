"""FlagAI's `flagai.auto_model.auto_loader`: the one AutoLoader, re-exported."""

from aquila.inference.loader import AutoLoader

__all__ = ["AutoLoader"]
