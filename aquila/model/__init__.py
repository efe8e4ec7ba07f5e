"""The Aquila (LLaMA-architecture) model. A package so that FlagAI's import paths (`aquila.model.predictor...`) resolve."""

from aquila.model.aquila_model import (
    AquilaModel,
    Attention,
    CachedRows,
    FeedForward,
    RMSNorm,
    TransformerBlock,
    apply_rotary,
    rotary_tables,
)

__all__ = [
    "AquilaModel",
    "Attention",
    "CachedRows",
    "FeedForward",
    "RMSNorm",
    "TransformerBlock",
    "apply_rotary",
    "rotary_tables",
]
