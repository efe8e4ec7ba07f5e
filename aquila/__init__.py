"""aquila: pretrain, fine-tune and serve Aquila-style bilingual LLMs, FlagAI-compatible."""

from aquila.config import ModelArgs
from aquila.errors import AquilaError

__version__ = "0.1.0"

__all__ = ["AquilaError", "AutoLoader", "ModelArgs", "Predictor", "Tokenizer", "__version__"]


# --- lazy exports (inference); keep `import aquila` free of torch-heavy imports ---------------------------------
_LAZY_EXPORTS = {
    "AutoLoader": "aquila.inference.loader",
    "Predictor": "aquila.inference.predictor",
    "Tokenizer": "aquila.tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'aquila' has no attribute {name!r}")


# --- end lazy exports ---------------------------------------------------------------------------------------------
