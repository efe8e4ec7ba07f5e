"""Names and values more than one layer of aquila shares, each defined here once. Torch-free: the launcher and
the config readers import it before anything heavy."""

from __future__ import annotations

# A model directory (FlagAI's and Hugging Face's names).
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
WEIGHT_NAMES = (SAFETENSORS_NAME, BIN_NAME)  # the order weights are looked for in: safetensors first

# The label of a token the loss skips (PyTorch's cross_entropy default, FlagAI's and Hugging Face's too).
IGNORE_INDEX = -100
