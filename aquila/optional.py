"""Optional dependencies: a missing one is one error line naming the setup.py extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from aquila.errors import AquilaError

# top-level module -> the extra (setup.py extras_require) that installs it
EXTRAS: dict[str, str] = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "tensorboard": "logging",
    "matplotlib": "logging",
    "bmtrain": "bmtrain",
    "bminf": "bminf",
    "flash_attn": "gpu",
    "gguf": "gguf",
}


def require(module: str, feature: str) -> ModuleType:
    """`import module`, or AquilaError `<feature> needs the '<extra>' extra: pip install "aquila[<extra>]" (...)`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS[module.partition(".")[0]]
        reason = str(e).splitlines()[0] if str(e) else f"no module named {module!r}"
        raise AquilaError(f'{feature} needs the {extra!r} extra: pip install "aquila[{extra}]" ({reason})') from None
