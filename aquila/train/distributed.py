"""Process group and parallelism, applied to the single-device model from outside (torchtitan style).

env_type: `pytorch` (one process), `pytorchDDP` (DistributedDataParallel), `fsdp` (FSDP2 `fully_shard` on
every transformer block and at the root) and `bmtrain` (CUDA only; see `aquila.train.bmtrain_backend`).
Ranks come from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from aquila.errors import AquilaError
from aquila.optional import require
from aquila.train.config import TrainConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    env_type: str  # resolved: pytorch, pytorchDDP, fsdp or bmtrain

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise AquilaError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_env(cfg: TrainConfig) -> DistEnv:
    """Ranks, device and env_type from torchrun's environment, without starting anything."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    env_type = cfg.env_type
    if env_type == "auto":
        env_type = "pytorch" if world == 1 else "fsdp"
    if env_type == "pytorch" and world > 1:
        raise AquilaError(f"env_type pytorch runs one process but WORLD_SIZE is {world}; use pytorchDDP or fsdp")
    if cfg.pytorch_device:
        device = torch.device(cfg.pytorch_device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AquilaError(f"pytorch_device {cfg.pytorch_device!r}: CUDA is not available on this machine")
    if env_type == "bmtrain":
        if device.type != "cuda":
            raise AquilaError("env_type bmtrain needs CUDA; on CPU use env_type fsdp or pytorchDDP")
        require("bmtrain", "env_type bmtrain")
    if cfg.enable_flash_attn_models and device.type == "cuda":
        require("flash_attn", "enable_flash_attn_models: True")
    if cfg.fp16 and device.type != "cuda":
        raise AquilaError("fp16 needs CUDA; on CPU train in fp32 (fp16: False) or bf16: True")
    return DistEnv(rank, world, local_rank, device, env_type)


def init_distributed(env: DistEnv, cfg: TrainConfig) -> None:
    """Start the process group (also for one process under DDP/FSDP, which need one)."""
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.env_type == "bmtrain":
        from aquila.train.bmtrain_backend import init

        init(cfg.seed)
        return
    if env.env_type == "pytorch" or dist.is_initialized():
        return
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
    if "MASTER_ADDR" not in os.environ:
        if env.world_size > 1:
            raise AquilaError("WORLD_SIZE > 1 but MASTER_ADDR is not set; start with torchrun")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is set on any rank (all ranks must call it: it is a collective)."""
    return all_reduce_sum(torch.tensor([float(flag)], device=env.device)).item() > 0


def _checkpointed_forward(block: nn.Module, inner, *args, **kwargs):
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward. Patches forward, so parameter names do not change."""
    for block in model.layers:
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (module.compile keeps the state-dict keys)."""
    for block in model.layers:
        block.compile(dynamic=False)


def parallelize(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """Activation checkpointing, compile, then DDP or FSDP2 (order as torchtitan). Returns the model to call."""
    if cfg.checkpoint_activations:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    if env.env_type == "pytorchDDP":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if env.env_type == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        kwargs = {"mesh": mesh}
        if cfg.bmt_cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        n = len(model.layers)
        for i, block in enumerate(model.layers):
            # The last block's parameters are needed again at once by backward: keep them gathered.
            fully_shard(block, reshard_after_forward=i < n - 1, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if env.env_type == "bmtrain":
        from aquila.train.bmtrain_backend import wrap_model

        return wrap_model(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, env: DistEnv, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on non-final micro-steps of gradient accumulation."""
    if env.env_type == "pytorchDDP" and not sync:
        with model.no_sync():
            yield
        return
    if env.env_type == "fsdp":
        model.set_requires_gradient_sync(sync)
    yield
