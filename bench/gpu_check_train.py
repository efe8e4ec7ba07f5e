"""Parts `train` and `fit7b` of bench/gpu_check.py: FSDP2 training as torchtitan sets it up.

The single-device model gets activation checkpointing (aquila.train.distributed), `torch.compile` per block, then
the trainer's own FSDP wrapping (`FSDPBackend.wrap`): `fully_shard` per block and at the root with
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 master weights and optimizer state, bf16 compute,
fp32 gradient reduction (no autocast).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from gpu_check_common import Budget, dtype_name, error_text, free_cuda, peak_gib, reset_peak, row, sync


@dataclass(frozen=True)
class TrainSetup:
    model: str
    device: str
    seq: int
    batch: int
    compute_dtype: str  # "bfloat16" on CUDA
    checkpoint_activations: bool
    compile_backend: str | None  # None: eager blocks
    offload: bool = False


def start_process_group(device: str):
    """The library's FSDP backend starts a one-process group (NCCL on CUDA, gloo on CPU)."""
    from aquila.train.config import TrainConfig
    from aquila.train.distributed import FSDPBackend, resolve_env

    env = resolve_env(TrainConfig(env_type="fsdp", pytorch_device=device))
    FSDPBackend(env, TrainConfig(env_type="fsdp")).start()
    return env


def fsdp_backend(s: TrainSetup):
    """The trainer's FSDP backend for this setup (one process; its policy: param s.compute_dtype, reduce fp32)."""
    from aquila.train.config import TrainConfig
    from aquila.train.distributed import FSDPBackend, resolve_env

    half = {"bfloat16": {"bf16": True}, "float16": {"fp16": True}}[s.compute_dtype]
    cfg = TrainConfig(env_type="fsdp", pytorch_device=s.device, bmt_cpu_offload=s.offload, **half)
    return FSDPBackend(resolve_env(cfg), cfg)


def shard(model, s: TrainSetup):
    """Activation checkpointing, compile, then the trainer's FSDP2 wrapping (torchtitan's order)."""
    from aquila.train.distributed import apply_activation_checkpointing

    if s.checkpoint_activations:
        apply_activation_checkpointing(model)
    if s.compile_backend:
        for block in model.layers:
            block.compile(backend=s.compile_backend, dynamic=False)
    return fsdp_backend(s).wrap(model)


def train_step(model, optimizer, ids) -> float:
    import torch

    loss = model(ids, labels=ids)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def random_batch(vocab: int, batch: int, seq: int, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


def run_speed(s: TrainSetup, warmup: int, steps: int, peak_tflops: float, spec_tflops: float) -> None:
    import torch

    from aquila.checkpoint import build_model
    from aquila.config import ModelArgs
    from aquila.train.config import TrainConfig
    from aquila.train.metrics import flops_per_token
    from aquila.train.optim import build_optimizer

    device = torch.device(s.device)
    margs = ModelArgs.from_name(s.model)
    model = shard(build_model(margs, device, torch.float32, seed=0), s)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.1, adam_beta2=0.95))
    ids = random_batch(margs.vocab_size, s.batch, s.seq, device)
    t0 = time.perf_counter()
    train_step(model, optimizer, ids)
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        train_step(model, optimizer, ids)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = train_step(model, optimizer, ids)
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    tokens = s.batch * s.seq
    achieved = flops_per_token(margs, s.seq) * tokens / dt / 1e12
    how = f"{'AC, ' if s.checkpoint_activations else ''}{'compiled blocks' if s.compile_backend else 'eager'}"
    row(
        f"train {s.model} FSDP2 {dtype_name(s.compute_dtype)}/fp32",
        f"batch {s.batch} x seq {s.seq} ({how}; {fsdp_backend(s).mixed_precision}): {dt * 1000:.0f} ms/step, loss {loss:.3f}; first step"
        f" (compile) {first_s:.0f} s",
    )
    row("train tokens/s", f"{tokens / dt:,.0f}")
    row("train MFU vs measured matmul peak", f"{achieved / peak_tflops * 100:.1f}% ({achieved:.3g} TFLOP/s)")
    if device.type == "cuda":
        row(f"train MFU vs {spec_tflops:.0f} TFLOP/s spec", f"{achieved / spec_tflops * 100:.1f}% (target >= 45%)")
    row("train peak memory", peak_gib(device))


def train_part(args, budget: Budget) -> None:
    import torch

    from aquila.train.metrics import measure_matmul_tflops

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16
    start_process_group(args.device)
    peak = measure_matmul_tflops(torch.device(args.device), dtype, size=8192 if cuda else 256)
    row(f"measured {dtype_name(dtype)} matmul peak", f"{peak:.4g} TFLOP/s ({'8192^3' if cuda else '256^3'})")
    setup = TrainSetup(
        args.train_model,
        args.device,
        args.train_seq,
        args.train_batch,
        dtype_name(dtype),
        args.checkpoint_activations,
        args.compile_backend,
    )
    # Out of memory: again with activation checkpointing; a compile failure: again with eager blocks.
    for _ in range(3):
        name = (
            f"train {setup.model} ({'AC, ' if setup.checkpoint_activations else ''}{setup.compile_backend or 'eager'})"
        )
        try:
            run_speed(setup, args.warmup, args.steps, peak, args.spec_tflops)
            return
        except torch.OutOfMemoryError:
            if setup.checkpoint_activations:
                row(name, f"out of memory at batch {setup.batch} x seq {setup.seq}")
                return
            row(name, "out of memory: again with activation checkpointing")
            setup = replace(setup, checkpoint_activations=True)
        except Exception as e:
            if not setup.compile_backend:
                raise
            row(name, error_text(e) + "; again with eager blocks")
            setup = replace(setup, compile_backend=None)
        free_cuda()
        torch._dynamo.reset()
        if not budget.allows(f"train {setup.model} retry", 45):
            return


def fit_once(s: TrainSetup, fused: bool) -> None:
    """Build on meta, shard, materialise on the device, one step; rows with the peak memory."""
    import torch

    from aquila.checkpoint import meta_model
    from aquila.config import ModelArgs
    from aquila.train.config import TrainConfig
    from aquila.train.optim import build_optimizer

    device = torch.device(s.device)
    margs = ModelArgs.from_name(s.model)
    reset_peak(device)
    model = shard(meta_model(margs), s)
    model.to_empty(device="cpu" if s.offload else device)
    model.init_weights()
    cfg = TrainConfig(lr=1e-5, weight_decay=0.1, adam_beta2=0.95)
    if fused:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    else:
        optimizer = build_optimizer(model, cfg)
    ids = random_batch(margs.vocab_size, s.batch, s.seq, device)
    t0 = time.perf_counter()
    loss = train_step(model, optimizer, ids)
    sync(device)
    dt = time.perf_counter() - t0
    how = (
        f"{margs.num_params() / 1e9:.2f}B params, FSDP2 1 process, {dtype_name(s.compute_dtype)} params/fp32 master,"
        f" AC, {'fused' if fused else 'library'} AdamW{', CPU offload' if s.offload else ''}"
    )
    row(f"fit {s.model} one step seq {s.seq}", f"ok ({how}): {dt:.1f} s, loss {loss:.3f}")
    row(f"fit {s.model} peak memory", peak_gib(device))
    del model, optimizer


def fit7b_part(args, budget: Budget) -> None:
    """Aquila-7B on meta -> FSDP2 (bf16 params) -> one step at seq 2048 with AC; if it does not fit: fused AdamW,
    then CPU offload."""
    import torch

    start_process_group(args.device)
    base = TrainSetup(args.fit_model, args.device, args.fit_seq, 1, "bfloat16", True, None)
    attempts = [(base, False), (base, True), (replace(base, offload=True), True)]
    for setup, fused in attempts:
        name = f"fit {setup.model} ({'fused AdamW' if fused else 'library AdamW'}{', CPU offload' if setup.offload else ''})"
        if not budget.allows(name, 30):
            return
        try:
            fit_once(setup, fused)
            return
        except torch.OutOfMemoryError as e:
            row(name, f"out of memory ({str(e).splitlines()[0][:120]})")
        free_cuda()
