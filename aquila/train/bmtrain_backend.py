"""env_type `bmtrain`: BMTrain's ZeRO-3 wrapper, CUDA only, imported only when chosen.

BMTrain is not installable on CPU machines; this path is written against BMTrain's public API
(`init_distributed`, `BMTrainModelWrapper`, `optim.clip_grad_norm`) and has not run anywhere yet: bmtrain has
no wheel for the GPU machine's torch (bench/README.md, GPU). FSDP2 (env_type fsdp) is the tested equivalent and
the default.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from aquila.errors import AquilaError
from aquila.optional import require
from aquila.train.distributed import Backend


def _bmt():
    return require("bmtrain", "env_type bmtrain")


class BMTrainBackend(Backend):
    def start(self) -> None:
        """BMTrain's communicator from torchrun's environment, plus a torch process group for our all-reduces."""
        bmt = _bmt()
        super().start()
        bmt.init_distributed(seed=self.cfg.seed)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))

    def wrap(self, model: nn.Module) -> nn.Module:
        bmt = _bmt()
        if not hasattr(bmt, "BMTrainModelWrapper"):
            raise AquilaError("env_type bmtrain needs bmtrain >= 0.2.3 (BMTrainModelWrapper)")
        return bmt.BMTrainModelWrapper(model)

    def clip_grad_norm(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """Global gradient norm over the sharded parameters (BMTrain reduces it across ranks)."""
        return float(_bmt().optim.clip_grad_norm(optimizer.param_groups, max_norm))

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """BMTrain blocks gather their shards in state_dict() (collective); FlagAI's names on rank 0."""
        state = model.state_dict()
        if not self.env.is_main:
            return None
        return {k.replace("._module.", "."): v.detach().cpu() for k, v in state.items()}

    def save_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
        torch.save(optimizer.state_dict(), path.with_suffix(f".rank{self.env.rank}.pt"))

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
        optimizer.load_state_dict(torch.load(path.with_suffix(f".rank{self.env.rank}.pt"), weights_only=True))
