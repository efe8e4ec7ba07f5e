"""FlagAI's `flagai.model.predictor.predictor`: the one Predictor, re-exported."""

from aquila.inference.predictor import Predictor

__all__ = ["Predictor"]
