"""`aquila estimate`: will a training configuration fit, before it is queued on a cluster.

The per-device peak memory of one training step is measured, not computed from a formula: the real model, LoRA,
activation checkpointing, the env_type's Backend (FSDP2 sharding and its MixedPrecisionPolicy, autocast) and the
real AdamW run one step on fake tensors (`FakeTensorMode`: shapes and dtypes, no storage) over a fake process
group of the target's size, under torch's own `MemTracker`, which counts every live tensor by kind (parameters,
gradients, optimizer state, activations, temporaries) at its peak. This is torchtitan's memory estimation, fed
from FlagAI's YAML.

What the fake run cannot see is added explicitly and named in the report: DDP's gradient buckets (its C++
reducer allocates them outside the dispatcher), the CUDA context and library workspaces (`--reserve`), and what
`bmt_cpu_offload` moves to the host (derived from the same run). Every transformer block is the same, so the
step is measured at two small depths and extrapolated to the model's, phase by phase and kind by kind; the test
suite checks that against full-depth runs and against real runs measured by the same tracker.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from aquila.cli_help import HelpFormatter
from aquila.config import ModelArgs
from aquila.errors import AquilaError
from aquila.train.config import TrainConfig, parse_config

PHASES = ("forward/backward", "optimizer step")
KINDS = ("Parameter", "Gradient", "Optstate", "Activation", "Temp", "Buffer", "Other")
SHOWN = {"Parameter": "params", "Gradient": "grads", "Optstate": "optimizer", "Activation": "activations",
         "Temp": "temporaries", "Buffer": "buffers", "Other": "other"}  # fmt: skip
CUDA_RESERVE = "1GiB"  # CUDA context + cuBLAS/NCCL workspaces on a GPU, which no tensor accounts for
GIB = 2**30


@dataclass(frozen=True)
class Target:
    """Where the run is to happen: how many devices, of which type and size."""

    world_size: int
    device_type: str  # "cuda" or "cpu": decides the default precision, as the trainer's does
    memory: int | None  # bytes per device, None: not checked
    reserve: int  # bytes per device outside any tensor


@dataclass
class StepMemory:
    """Per-device peak bytes of one training step on rank 0, by phase and by kind of tensor."""

    phases: dict[str, dict[str, int]]
    extra: dict[str, int]  # name -> bytes added to every phase (DDP buckets, reserve)
    host: int = 0  # bytes kept on the host instead (bmt_cpu_offload)

    def phase_total(self, phase: str) -> int:
        return sum(self.phases[phase].values()) + sum(self.extra.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.phase_total(self.peak_phase)


def parse_size(text: str) -> int:
    """`80GiB`, `80GB`, `512MiB`, `24g` or a byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise AquilaError(f"memory size {text!r}: expected a number with a unit, e.g. 80GiB")
    scale = 1024 if m.group(3).startswith("i") or m.group(3) == "" else 1000
    return int(float(m.group(1)) * scale ** "bkmgt".index(m.group(2) or "b"))


def target_precision(cfg: TrainConfig, target: Target) -> torch.dtype | None:
    """The compute dtype the trainer would pick on the target (fp16 is refused on CPU there, so here too)."""
    from aquila.train.distributed import DistEnv, amp_dtype

    if target.device_type != "cuda" and cfg.fp16:
        cfg = dataclasses.replace(cfg, fp16=False)
    env = DistEnv(0, target.world_size, 0, torch.device(target.device_type), cfg.env_type)
    return amp_dtype(cfg, env)


def resolved_env_type(cfg: TrainConfig, world_size: int) -> str:
    if cfg.env_type == "auto":
        return "pytorch" if world_size == 1 else "fsdp"
    if cfg.env_type == "pytorch" and world_size > 1:
        raise AquilaError(f"env_type pytorch runs one process but the target has {world_size} devices")
    if cfg.env_type == "bmtrain":
        raise AquilaError("env_type bmtrain is not estimated (BMTrain is CUDA-only); estimate env_type fsdp instead")
    return cfg.env_type


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """Rank 0 of a process group whose collectives return at once without data (torch's own fake backend)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise AquilaError("aquila estimate runs in its own process, not inside a training process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _trainable_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's trainable parameters (for FSDP2's DTensors: the local shard, not the global size)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters() if p.requires_grad]
    return sum(t.numel() * t.element_size() for t in local)


def step_memory(cfg: TrainConfig, args: ModelArgs, target: Target, seq_length: int, fake: bool = True) -> StepMemory:
    """One training step of `cfg` on rank 0 of `target`, under MemTracker. `fake` False runs it for real (in a
    process group that already exists: the tests' measurement of the same step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from aquila.model.aquila_model import AquilaModel
    from aquila.train.backends import make_backend
    from aquila.train.distributed import Backend, DistEnv
    from aquila.train.optim import build_optimizer

    env_type = resolved_env_type(cfg, target.world_size)
    offload = env_type == "fsdp" and cfg.bmt_cpu_offload
    # Offload is derived below from the run without it: on a CPU-only machine there is no second memory to move to.
    run_cfg = dataclasses.replace(cfg, bmt_cpu_offload=False, compile=False)
    rank = 0 if fake else dist.get_rank()
    env = DistEnv(rank, target.world_size, 0, torch.device("cpu"), env_type)
    # DDP's C++ reducer cannot run on fake tensors: the bare model stands in, plus DDP's one gradient bucket copy.
    simulated_ddp = fake and env_type == "pytorchDDP"
    backend = Backend(env, run_cfg) if simulated_ddp else make_backend(env, run_cfg)
    backend.compute_dtype = target_precision(cfg, target)
    backend.start()  # the process group exists already; FSDP2's device mesh is made here, outside fake mode

    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    tracker = MemTracker()
    with mode:
        gen = torch.Generator().manual_seed(cfg.seed)
        model = AquilaModel(args)
        if not fake:
            model.init_weights(gen)
        if cfg.lora:
            from aquila.lora import apply_lora, lora_config

            apply_lora(model, lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules))
        model.train()
        buckets = _trainable_bytes(model) if simulated_ddp else 0
        wrapped = backend.parallelize(model)
        optimizer = build_optimizer(wrapped, run_cfg)
        ids = torch.randint(0, args.vocab_size, (cfg.batch_size, seq_length), generator=gen)
        micro_steps = min(2, cfg.gradient_accumulation_steps)  # from the second on, every gradient exists already
        max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
        params = [p for p in wrapped.parameters() if p.requires_grad]

        def forward_backward() -> None:
            for m in range(micro_steps):
                tracker.reset_mod_stats()  # its per-module records allow one forward each
                with backend.gradient_sync(wrapped, sync=m == micro_steps - 1), backend.autocast():
                    loss = wrapped(ids, labels=ids)["loss"]
                loss.backward()
                del loss

        def optimizer_step() -> None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        tracker.track_external(wrapped, optimizer)
        with tracker:  # the first step creates the optimizer state; the second is the one measured
            forward_backward()
            optimizer_step()
        phases = {}
        for phase, run in zip(PHASES, (forward_backward, optimizer_step)):
            with tracker:  # entering the tracker starts its peak from the current memory
                run()
            snap = tracker.get_tracker_snapshot("peak")
            phases[phase] = {k: v for k, v in snap.get(torch.device("cpu"), {}).items() if k in KINDS}
        host = 0
        if offload:
            # FSDP2's CPUOffloadPolicy keeps the sharded fp32 parameters, their gradients and the optimizer state
            # (and so the optimizer step) on the host; the device holds what is gathered for compute.
            shard = _trainable_bytes(wrapped)
            host = shard * 2 + phases[PHASES[1]].get("Optstate", 0)
            for kinds in phases.values():
                kinds["Parameter"] = max(0, kinds.get("Parameter", 0) - shard)
                kinds["Gradient"] = max(0, kinds.get("Gradient", 0) - shard)
                kinds["Optstate"] = 0
            phases[PHASES[1]] = {k: 0 for k in phases[PHASES[1]]}
    extra = {}
    if buckets:
        extra["DDP gradient buckets"] = buckets
    if target.reserve:
        extra["CUDA context and workspaces"] = target.reserve
    return StepMemory(phases, extra, host)


def _with_layers(args: ModelArgs, n: int) -> ModelArgs:
    return dataclasses.replace(args, n_layers=n)


def estimate(cfg: TrainConfig, args: ModelArgs, target: Target, seq_length: int) -> StepMemory:
    """step_memory at the model's depth: measured at two small depths and extrapolated per phase and kind (every
    block adds the same tensors; from 3 blocks on, FSDP2's first- and last-block effects are constant), or
    measured directly when the model is that shallow."""
    lo, hi = 3, 4
    if args.n_layers <= hi:
        with fake_process_group(target.world_size):
            return step_memory(cfg, args, target, seq_length)
    with fake_process_group(target.world_size):
        a = step_memory(cfg, _with_layers(args, lo), target, seq_length)
    with fake_process_group(target.world_size):
        b = step_memory(cfg, _with_layers(args, hi), target, seq_length)
    k = args.n_layers - lo
    phases = {
        phase: {kind: max(0, a.phases[phase].get(kind, 0) + k * (b.phases[phase].get(kind, 0)
                                                                  - a.phases[phase].get(kind, 0)))
                for kind in set(a.phases[phase]) | set(b.phases[phase])}
        for phase in PHASES
    }  # fmt: skip
    extra = {name: a.extra[name] + k * (b.extra[name] - a.extra[name]) for name in a.extra}
    return StepMemory(phases, extra, a.host + k * (b.host - a.host))


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _unit(peak: int) -> tuple[str, int]:
    return ("GiB", GIB) if peak >= 4 * GIB else ("MiB", 2**20)


def alternatives(cfg: TrainConfig, target: Target) -> Iterator[tuple[str, TrainConfig, Target]]:
    """Changes that lower the peak, cheapest first; each keeps the global batch."""
    if not cfg.checkpoint_activations:
        yield "checkpoint_activations: True", dataclasses.replace(cfg, checkpoint_activations=True), target
        cfg = dataclasses.replace(cfg, checkpoint_activations=True)
    env_type = resolved_env_type(cfg, target.world_size)
    if env_type == "fsdp" and not cfg.bmt_cpu_offload:
        yield "bmt_cpu_offload: True", dataclasses.replace(cfg, bmt_cpu_offload=True), target
    batch, accum = cfg.batch_size, cfg.gradient_accumulation_steps
    while batch > 1:
        batch, accum = (batch + 1) // 2, accum * 2
        yield (f"batch_size: {batch}, gradient_accumulation_steps: {accum}",
               dataclasses.replace(cfg, batch_size=batch, gradient_accumulation_steps=accum), target)  # fmt: skip
    if env_type in ("fsdp", "pytorch"):
        more = dataclasses.replace(cfg, env_type="fsdp")
        for world in (target.world_size * 2, target.world_size * 4):
            yield f"env_type fsdp on {world} devices", more, dataclasses.replace(target, world_size=world)


def fits(mem: StepMemory, target: Target) -> bool:
    return target.memory is None or mem.peak <= target.memory


def report(name: str, cfg: TrainConfig, args: ModelArgs, target: Target, seq_length: int, mem: StepMemory) -> str:
    from aquila.train.distributed import _short_dtype

    dtype = target_precision(cfg, target)
    env_type = resolved_env_type(cfg, target.world_size)
    precision = "fp32" if dtype is None else _short_dtype(dtype)
    unit, div = _unit(mem.peak)

    def fmt(n: int) -> str:
        return f"{n / div:.2f}" if div == GIB else f"{n / div:.1f}"

    lines = [
        f"{name}: model {cfg.model_name} ({args.num_params() / 1e6:,.1f}M params), env_type {env_type} on"
        f" {target.world_size} x {target.device_type}, {precision}, micro-batch {cfg.batch_size} x seq {seq_length},"
        f" accumulation {cfg.gradient_accumulation_steps}, activation checkpointing"
        f" {'on' if cfg.checkpoint_activations else 'off'}, CPU offload {'on' if cfg.bmt_cpu_offload else 'off'}"
        + (f", LoRA r={cfg.lora_r}" if cfg.lora else ""),
        f"per-device peak memory of one step, rank 0 ({unit}):",
        f"  {'phase':<18}" + "".join(f"{SHOWN[k]:>13}" for k in KINDS[:5]) + f"{'other':>9}{'total':>9}",
    ]
    for phase in PHASES:
        kinds = mem.phases[phase]
        other = sum(kinds.get(k, 0) for k in KINDS[5:]) + sum(mem.extra.values())
        lines.append(f"  {phase:<18}" + "".join(f"{fmt(kinds.get(k, 0)):>13}" for k in KINDS[:5])
                     + f"{fmt(other):>9}{fmt(mem.phase_total(phase)):>9}")  # fmt: skip
    for what, n in mem.extra.items():
        lines.append(f"  other includes {what}: {fmt(n)} {unit}")
    if mem.host:
        lines.append(f"  on the host (bmt_cpu_offload): {fmt(mem.host)} {unit} per process")
    verdict = f"peak {fmt(mem.peak)} {unit} ({mem.peak_phase})"
    if target.memory is not None:
        verdict += f" of {fmt(target.memory)} {unit}: " + ("fits" if fits(mem, target) else "does NOT fit")
    lines.append(verdict)
    return "\n".join(lines)


def load_target_config(argv: list[str]) -> tuple[argparse.Namespace, TrainConfig]:
    parser = argparse.ArgumentParser(
        prog="aquila estimate",
        description="Per-device peak memory of one training step of a YAML config, measured on fake tensors."
        " Any training flag (--model_name, --batch_size, ...) overrides the YAML as in aquila pretrain.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--yaml_config", required=True, help="the training YAML (FlagAI keys)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="devices = the sum of the hostfile's slots")
    where.add_argument("--gpus", type=int, default=None, help="number of devices (default 1)")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory per device ('none': do not check)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the target's device type")
    parser.add_argument("--reserve", default=None, help=f"per-device memory outside tensors (cuda: {CUDA_RESERVE})")
    parser.add_argument("--no-suggest", action="store_true", help="do not search for a configuration that fits")
    ns, rest = parser.parse_known_args(argv)
    cfg = parse_config(["--yaml_config", ns.yaml_config, *rest], "aquila estimate")
    return ns, cfg


def model_args(cfg: TrainConfig) -> ModelArgs:
    """The model the run would train: pre_load_dir/model_name's config.json if present, else the preset (the
    trainer's rule; weights are not needed to estimate)."""
    from aquila.checkpoint import ModelDir
    from aquila.train.model_source import locate_model

    source = locate_model(cfg.model_name, cfg.pre_load_dir, bmt_pre_load=False)
    return ModelDir.open(source.model_dir).args if source.model_dir else ModelArgs.from_name(cfg.model_name)


def main(argv: list[str]) -> int:
    ns, cfg = load_target_config(argv)
    if ns.hostfile:
        from aquila.launch.hostfile import parse_hostfile

        world = sum(node.slots for node in parse_hostfile(ns.hostfile))
    else:
        world = ns.gpus if ns.gpus is not None else 1
    if world < 1:
        raise AquilaError(f"--gpus must be >= 1, got {world}")
    reserve = ns.reserve if ns.reserve is not None else (CUDA_RESERVE if ns.device == "cuda" else "0")
    memory = None if ns.gpu_memory.lower() == "none" else parse_size(ns.gpu_memory)
    target = Target(world, ns.device, memory, parse_size(reserve))
    args = model_args(cfg)
    seq_length = cfg.seq_length or args.max_seq_len
    if seq_length > args.max_seq_len:
        raise AquilaError(f"seq_length {seq_length} is above the model's max_seq_len {args.max_seq_len}")
    torch.set_num_threads(1)  # fake tensors compute nothing; threads only add start-up time
    mem = estimate(cfg, args, target, seq_length)
    print(report(Path(ns.yaml_config).name, cfg, args, target, seq_length, mem), flush=True)
    if fits(mem, target) or ns.no_suggest:
        return 0
    print("what would fit:", flush=True)
    for what, alt_cfg, alt_target in alternatives(cfg, target):
        alt = estimate(alt_cfg, args, alt_target, seq_length)
        ok = fits(alt, alt_target)
        print(f"  {what}: peak {_gib(alt.peak)} GiB {'fits' if ok else 'does not fit'}", flush=True)
        if ok:
            return 1
    print("  nothing tried fits: more devices, a shorter seq_length or a smaller model", flush=True)
    return 1
