import os

# OpenMP workers that spin-wait slow small matmuls 10-50x when other processes share the cores (subprocesses
# started by tests inherit this too). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from aquila.checkpoint import build_model
from aquila.config import ModelArgs


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=16, max_seq_len=64, initializer_range=0.05)
    base.update(overrides)
    return ModelArgs(**base)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_args(), seed=0).eval()
