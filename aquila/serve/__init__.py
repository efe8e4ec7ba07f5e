"""HTTP serving: `create_app(predictor, limits)` builds the FastAPI app; `aquila serve` runs it with uvicorn."""

from __future__ import annotations

from aquila.optional import require

for _module in ("fastapi", "uvicorn", "prometheus_client"):
    require(_module, "aquila serve")


def __getattr__(name: str):
    if name in ("create_app", "ServerLimits"):
        from aquila.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'aquila.serve' has no attribute {name!r}")
