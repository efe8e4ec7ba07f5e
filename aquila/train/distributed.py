"""Process group and parallelism, applied to the single-device model from outside (torchtitan style).

One `Backend` object per env_type holds everything the four do differently: starting the process group,
wrapping the model, how bf16/fp16 is applied (torch.autocast, or FSDP2's MixedPrecisionPolicy), skipping the
gradient sync on accumulation micro-steps, the gradient-norm clip, the full state dict for checkpoints and the
optimizer state's files.
  pytorch     one process, the bare model (`Backend`)
  pytorchDDP  DistributedDataParallel (`DDPBackend`)
  fsdp        FSDP2 `fully_shard` on every transformer block and at the root, bf16/fp16 by its
              MixedPrecisionPolicy (`FSDPBackend`)
  bmtrain     BMTrain's ZeRO-3 wrapper, CUDA only (`aquila.train.bmtrain_backend.BMTrainBackend`)
`aquila.train.backends.make_backend` picks one by env_type.
Ranks come from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

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
    return DistEnv(rank, world, local_rank, device, env_type)


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


def on_every_rank(body, env: DistEnv):
    """Run `body` on every rank (all must call this: it is a collective). An AquilaError on any rank is raised
    on all of them, so rank 0 (the one that prints) reports a failure that only another rank saw, naming it;
    the other ranks stop instead of waiting in the next collective."""
    result, error = None, None
    try:
        result = body()
    except AquilaError as e:
        error = str(e)
    errors = [error]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, first = failed[0]
        everywhere = len(failed) == len(errors) and all(e == first for _, e in failed)
        raise AquilaError(first if everywhere else f"rank {rank}: {first}")
    return result


def amp_dtype(cfg: TrainConfig, env: DistEnv) -> torch.dtype | None:
    """The compute dtype of a run: fp16, bf16 (bf16: None means bf16 on CUDA), or None for fp32."""
    if cfg.fp16:
        return torch.float16
    if cfg.bf16 or (cfg.bf16 is None and env.device.type == "cuda"):
        return torch.bfloat16
    return None


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


class Backend:
    """env_type pytorch: one process and the model as it is. The other backends override what differs."""

    def __init__(self, env: DistEnv, cfg: TrainConfig) -> None:
        self.env, self.cfg = env, cfg
        self.compute_dtype = amp_dtype(cfg, env)

    @property
    def mixed_precision(self) -> str:
        """How this backend computes in bf16/fp16, for the log: fp32 weights under torch.autocast here."""
        return "fp32" if self.compute_dtype is None else f"{_short_dtype(self.compute_dtype)} torch.autocast"

    def autocast(self):
        """The context the loop runs every forward in (backward follows the forward's dtypes)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.compute_dtype)

    def start(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.set_device(self.env.device)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Activation checkpointing, compile, then the backend's wrapper (torchtitan's order). Returns the model to call."""
        if self.cfg.checkpoint_activations:
            apply_activation_checkpointing(model)
        if self.cfg.compile:
            apply_compile(model)
        return self.wrap(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def gradient_sync(self, model: nn.Module, sync: bool):
        """Context for one micro-step: `sync` False skips the gradient all-reduce (accumulation)."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The full CPU state dict on rank 0, None elsewhere (collective for sharding backends: all ranks call it)."""
        if not self.env.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self.unwrap(model).state_dict().items()}

    def save_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
        """A torch.distributed.checkpoint of the optimizer: it reshards across rank counts and backends."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, optimizer)
        with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
            dcp.save({"optim": osd}, checkpoint_id=str(path))

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if not path.is_dir():
            raise AquilaError(f"{path.parent}: load_optim is set but the checkpoint has no optimizer state")
        state = {"optim": get_optimizer_state_dict(model, optimizer)}  # empty Adam state as the load template
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
                dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # DCP raises CheckpointException and others for damaged files
            raise AquilaError(f"{path}: cannot read optimizer state ({type(e).__name__}: {str(e)[:200]})") from None
        set_optimizer_state_dict(model, optimizer, state["optim"])


class _ProcessGroupBackend(Backend):
    def start(self) -> None:
        """The torch process group, also for one process (DDP and FSDP need one)."""
        super().start()
        if dist.is_initialized():
            return
        backend = "nccl" if self.env.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=self.cfg.dist_timeout_s)
        if "MASTER_ADDR" not in os.environ:
            if self.env.world_size > 1:
                raise AquilaError("WORLD_SIZE > 1 but MASTER_ADDR is not set; start with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=self.env.rank, world_size=self.env.world_size, timeout=timeout)


class DDPBackend(_ProcessGroupBackend):
    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module

    def gradient_sync(self, model: nn.Module, sync: bool):
        return contextlib.nullcontext() if sync else model.no_sync()


class FSDPBackend(_ProcessGroupBackend):
    """FSDP2, torchtitan's way: with bf16/fp16 each block and the root get MixedPrecisionPolicy(param_dtype=bf16
    or fp16, reduce_dtype=fp32): the sharded parameters (master weights, AdamW state) stay fp32, FSDP2 gathers
    them in the compute dtype for forward and backward and reduces the gradients in fp32 onto the fp32 shards.
    No autocast: the parameters' dtype decides (RMSNorm statistics, the rotary and the loss upcast themselves)."""

    @property
    def mixed_precision(self) -> str:
        if self.compute_dtype is None:
            return "fp32"
        return f"FSDP2 MixedPrecisionPolicy(param {_short_dtype(self.compute_dtype)}, reduce fp32)"

    def autocast(self):
        return contextlib.nullcontext()

    def mp_policy(self):
        """None for fp32. cast_forward_inputs=False: the blocks' float inputs are the hidden states, already in
        the compute dtype (the embedding's weight is), and the rotary tables, which stay fp32 (as torchtitan's
        complex freqs_cis do, which its default cast leaves alone)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.compute_dtype is None:
            return None
        return MixedPrecisionPolicy(
            param_dtype=self.compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )

    mesh = None  # made by start(), outside any FakeTensorMode (aquila estimate wraps a fake model)

    def start(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        super().start()
        self.mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        kwargs = {"mesh": self.mesh or init_device_mesh(self.env.device.type, (self.env.world_size,))}
        policy = self.mp_policy()
        if policy is not None:
            kwargs["mp_policy"] = policy
        if self.cfg.bmt_cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        n = len(model.layers)
        for i, block in enumerate(model.layers):
            # The last block's parameters are needed again at once by backward: keep them gathered.
            fully_shard(block, reshard_after_forward=i < n - 1, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def gradient_sync(self, model: nn.Module, sync: bool):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.env.is_main else None


def _short_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))
