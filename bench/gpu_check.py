"""GPU check for training: versions, attention path, one bf16 training step of aquila-1b, BMTrain if present.

    python bench/gpu_check.py                      # on a CUDA machine (bench/gpu_check.sh wraps it)
    python bench/gpu_check.py --device cpu --model aquila-micro --seq 64 --batch 2   # CPU smoke test

Prints a table; every row is measured independently and a missing optional package (flash-attn, bmtrain) or a
failing row is reported as "absent" / "error: ...", never a crash. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS: list[tuple[str, str]] = []


def row(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"  {name}: {value}", file=sys.stderr, flush=True)


def guarded(name: str, fn) -> object | None:
    try:
        return fn()
    except Exception as e:  # a check must never take the whole report down
        row(name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        if os.environ.get("GPU_CHECK_TRACEBACK"):
            traceback.print_exc()
        return None


def package_version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as e:
        return f"absent ({type(e).__name__})"
    return str(getattr(mod, "__version__", "present"))


def versions(device) -> None:
    import torch

    row("torch", torch.__version__)
    row("CUDA (torch build)", str(torch.version.cuda or "none (CPU build)"))
    if device.type == "cuda":
        row(
            "device",
            f"{torch.cuda.get_device_name(device)} ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)",
        )
        row("cuDNN", str(torch.backends.cudnn.version()))
        row("NCCL", ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "absent")
    else:
        row("device", "cpu (CUDA not available)")
    row("flash-attn", package_version("flash_attn"))
    row("bmtrain", package_version("bmtrain"))


def attention_path(device, dtype) -> str:
    from aquila.attention import flash_available

    if flash_available(device) and dtype in (__import__("torch").float16, __import__("torch").bfloat16):
        return "flash-attn (flash_attn_func, causal)"
    if device.type == "cuda":
        return "torch SDPA (flash/efficient kernel chosen by torch)"
    return "torch SDPA (CPU)"


def train_step(args) -> None:
    import torch

    from aquila.checkpoint import build_model
    from aquila.config import ModelArgs
    from aquila.train.config import TrainConfig
    from aquila.train.distributed import apply_activation_checkpointing
    from aquila.train.metrics import flops_per_token, measure_matmul_tflops, peak_memory_mb
    from aquila.train.optim import build_optimizer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    margs = ModelArgs.from_name(args.model)
    seq = min(args.seq, margs.max_seq_len)
    row("attention path", attention_path(device, dtype))
    peak = measure_matmul_tflops(device, dtype, size=8192 if device.type == "cuda" else 512)
    row(f"measured {str(dtype).removeprefix('torch.')} matmul peak", f"{peak:.3g} TFLOP/s")
    model = build_model(margs, device, torch.float32, seed=0)
    if args.checkpoint_activations:
        apply_activation_checkpointing(model)
    opt = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.1, adam_beta2=0.95))
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, margs.vocab_size, (args.batch, seq + 1), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def one_step() -> float:
        with autocast:
            loss = model(ids, labels=ids)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * seq
    achieved = flops_per_token(margs, seq) * tokens / dt / 1e12
    row(
        f"train step {args.model} {str(dtype).removeprefix('torch.')}",
        f"batch {args.batch} x seq {seq}, {dt * 1000:.0f} ms/step, loss {loss:.3f}",
    )
    row("tokens/s", f"{tokens / dt:,.0f}")
    row("MFU vs measured matmul peak", f"{achieved / peak * 100:.1f}% ({achieved:.3g} TFLOP/s achieved)")
    if device.type == "cuda":
        row(f"MFU vs spec {args.spec_tflops:.0f} TFLOP/s", f"{achieved / args.spec_tflops * 100:.1f}%")
    row("peak memory", f"{peak_memory_mb(device):,.0f} MiB")


def trainer_smoke(args) -> None:
    """The real entry point (`aquila pretrain`) for 3 iterations on a synthetic indexed dataset: bf16 (or fp32 on
    CPU) single process, FSDP2 in one process, and fp16 with the dynamic loss scaler (CUDA only)."""
    import tempfile

    import numpy as np
    import torch

    from aquila.config import ModelArgs
    from aquila.data.indexed_dataset import MMapIndexedDatasetBuilder
    from aquila.train.pretrain import main as pretrain_main

    model = "aquila-tiny" if args.model == "aquila-1b" else args.model
    vocab = ModelArgs.from_name(model).vocab_size
    cuda = torch.cuda.is_available() and args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "synth")
        rng = np.random.default_rng(0)
        with MMapIndexedDatasetBuilder(prefix, np.int32) as b:
            for _ in range(200):
                start = int(rng.integers(0, vocab))
                b.add_document((start + np.arange(int(rng.integers(100, 400)))) % vocab)
            b.finalize()
        runs = [("pytorch", "bf16" if cuda else "fp32"), ("fsdp", "bf16" if cuda else "fp32"), ("pytorch", "fp16")]
        for env_type, precision in runs:
            name = f"trainer 3 steps {model} {env_type} {precision}"
            if precision == "fp16" and not cuda:
                row(name, "skipped (fp16 needs CUDA)")
                continue
            out = os.path.join(tmp, f"{env_type}-{precision}")
            flags = ["--model_name", model, "--data_prefix", prefix, "--seq_length", "64", "--batch_size", "4"]
            flags += [
                "--max_steps",
                "3",
                "--log_interval",
                "1",
                "--save_interval",
                "3",
                "--lr",
                "1e-3",
                "--env_type",
                env_type,
            ]
            flags += ["--save_dir", out, "--peak_tflops", "1", "--pytorch_device", args.device]
            flags += ["--fp16", str(precision == "fp16"), "--bf16", str(precision == "bf16")]
            t0 = time.perf_counter()
            rc = pretrain_main(flags)
            recs = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
            if rc != 0 or not recs:
                row(name, f"error: exit status {rc}")
            else:
                last = recs[-1]
                row(
                    name,
                    f"ok in {time.perf_counter() - t0:.1f} s, loss {recs[0]['loss']:.3f} -> {last['loss']:.3f}, loss scale {last['loss_scale']:.0f}",
                )


def bmtrain_step(args) -> None:
    """env_type bmtrain on one process (torchrun) with the trainer's own code path, if bmtrain imports."""
    try:
        import bmtrain  # noqa: F401
    except Exception:
        row("BMTrain step", "absent (bmtrain not importable)")
        return
    import torch

    if not torch.cuda.is_available():
        row("BMTrain step", "skipped (needs CUDA)")
        return
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        __file__,
        "--bmt-worker",
    ]
    cmd += ["--model", "aquila-tiny", "--seq", "512", "--batch", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    line = next((x for x in res.stdout.splitlines() if x.startswith("BMT ")), None)
    if res.returncode or line is None:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1][:200]
        row("BMTrain step", f"error: {tail}")
    else:
        r = json.loads(line[4:])
        row("BMTrain step (aquila-tiny)", f"{r['ms']:.0f} ms/step, loss {r['loss']:.3f}")


def bmt_worker(args) -> None:
    import torch

    from aquila.checkpoint import build_model
    from aquila.config import ModelArgs
    from aquila.train.config import TrainConfig
    from aquila.train.distributed import make_backend, resolve_env
    from aquila.train.optim import build_optimizer

    cfg = TrainConfig(env_type="bmtrain", lr=1e-4)
    env = resolve_env(cfg)
    backend = make_backend(env, cfg)
    backend.start()
    margs = ModelArgs.from_name(args.model)
    model = backend.parallelize(build_model(margs, env.device, seed=0))
    opt = build_optimizer(model, cfg)
    ids = torch.randint(0, margs.vocab_size, (args.batch, args.seq + 1), device=env.device)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print("BMT " + json.dumps({"ms": min(times) * 1000, "loss": float(loss.detach())}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--model", default="aquila-1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpoint-activations", action="store_true")
    p.add_argument("--spec-tflops", type=float, default=989.0, help="dense bf16 spec peak (H100/H200 SXM: ~989)")
    p.add_argument("--bmt-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bmt_worker:
        bmt_worker(args)
        return 0
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    t0 = time.time()
    guarded("versions", lambda: versions(device))
    guarded("training step", lambda: train_step(args))
    guarded("trainer", lambda: trainer_smoke(args))
    guarded("BMTrain step", lambda: bmtrain_step(args))
    row("check time", f"{time.time() - t0:.0f} s")
    width = max(len(k) for k, _ in ROWS)
    print(f"| {'check'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
    for k, v in ROWS:
        print(f"| {k.ljust(width)} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
