"""FlagAI's import path `flagai.auto_model`: `from aquila.auto_model.auto_loader import AutoLoader`."""
