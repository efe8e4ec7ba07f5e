"""aquila: pretrain, fine-tune and serve Aquila-style bilingual LLMs, FlagAI-compatible."""

from aquila.config import ModelArgs
from aquila.errors import AquilaError

__version__ = "0.1.0"

__all__ = ["AquilaError", "ModelArgs", "__version__"]
