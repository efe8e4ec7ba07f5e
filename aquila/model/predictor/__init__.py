"""FlagAI's import path `flagai.model.predictor`: `from aquila.model.predictor.predictor import Predictor`."""
