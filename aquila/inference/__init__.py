"""Inference: AutoLoader, Predictor, generation over the static KV cache, sampling, int8 quantization.

Submodules are imported on first use, so `import aquila.inference` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AutoLoader": "aquila.inference.loader",
    "load_model": "aquila.inference.loader",
    "Predictor": "aquila.inference.predictor",
    "SamplingParams": "aquila.inference.sampling",
    "Request": "aquila.inference.generate",
    "quantize_model": "aquila.inference.quantize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aquila.inference' has no attribute {name!r}")
