"""env_type `bmtrain`: BMTrain's ZeRO-3 wrapper, CUDA only, imported only when chosen.

BMTrain is not installable on CPU machines; this path is written against BMTrain's public API
(`init_distributed`, `BMTrainModelWrapper`, `optim.clip_grad_norm`) and is exercised by bench/gpu_check.sh
only where bmtrain imports. FSDP2 (env_type fsdp) is the tested equivalent and the default.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from aquila.errors import AquilaError
from aquila.optional import require


def _bmt():
    return require("bmtrain", "env_type bmtrain")


def init(seed: int) -> None:
    """BMTrain's communicator from torchrun's environment, plus a torch process group for our all-reduces."""
    bmt = _bmt()
    bmt.init_distributed(seed=seed)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))


def wrap_model(model: nn.Module) -> nn.Module:
    bmt = _bmt()
    if not hasattr(bmt, "BMTrainModelWrapper"):
        raise AquilaError("env_type bmtrain needs bmtrain >= 0.2.3 (BMTrainModelWrapper)")
    return bmt.BMTrainModelWrapper(model)


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Global gradient norm over the sharded parameters (BMTrain reduces it across ranks)."""
    bmt = _bmt()
    return bmt.optim.clip_grad_norm(optimizer.param_groups, max_norm)


def gather_state_dict(model: nn.Module, env) -> dict[str, torch.Tensor] | None:
    """Full state dict on rank 0: BMTrain blocks gather their shards in state_dict() (collective)."""
    state = model.state_dict()
    if not env.is_main:
        return None
    return {k.replace("._module.", "."): v.detach().cpu() for k, v in state.items()}
