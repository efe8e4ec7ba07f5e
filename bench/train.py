"""Training throughput on CPU: Aquila's trainer step vs transformers.LlamaForCausalLM, same shapes/data/AdamW.

    python bench/train.py [--steps 5] [--compile]

Each measurement runs in its own subprocess (clean peak RSS). Reported: tokens/s, MFU against the fp32 matmul
peak measured here, peak RSS; for vocab 16,008 (aquila-tiny shapes) and 100,008 (Aquila's real vocabulary); and
per-rank peak RSS of 2-process FSDP2 vs DDP (gloo). The machine is shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = dict(dim=256, n_layers=4, n_heads=8, multiple_of=32, max_seq_len=512, initializer_range=0.02)


def _args(vocab: int):
    from aquila.config import ModelArgs

    return ModelArgs(vocab_size=vocab, **SHAPES)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _data(vocab: int, batch: int, seq: int, steps: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(steps)]


def _build(impl: str, vocab: int, compile_: bool):
    import torch

    args = _args(vocab)
    if impl == "ours":
        from aquila.checkpoint import build_model

        model = build_model(args, seed=0)
        if compile_:
            for block in model.layers:
                block.compile(dynamic=False)

        def step(ids):
            return model(ids, labels=ids)["loss"]

    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=args.dim, intermediate_size=args.ffn_dim, num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps,
            max_position_embeddings=args.max_seq_len, tie_word_embeddings=False, attn_implementation="sdpa",
        )  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        if compile_:
            for block in model.model.layers:
                block.compile(dynamic=False)

        def step(ids):
            return model(input_ids=ids, labels=ids).loss

    if impl == "ours":  # the trainer's optimizer: AdamW, decay groups, fused kernel where available
        from aquila.train.config import TrainConfig
        from aquila.train.optim import build_optimizer

        opt = build_optimizer(model, TrainConfig(lr=1e-4, adam_beta2=0.95, weight_decay=0.1))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return model, step, opt


def worker(impl: str, vocab: int, batch: int, seq: int, steps: int, warmup: int, compile_: bool, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model, step, opt = _build(impl, vocab, compile_)
    data = _data(vocab, batch, seq, steps + warmup)
    wall, cpu = [], []
    for i, ids in enumerate(data):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    # The machine is shared: the least-disturbed step, and CPU seconds (what the step itself consumed).
    tokens = batch * seq
    return {
        "tokens_per_s": tokens / min(wall),
        "tokens_per_cpu_s": tokens / min(cpu),
        "peak_rss_mb": _peak_rss_mb(),
        "loss": float(loss.detach()),
    }


def dist_worker(mode: str, vocab: int, batch: int, seq: int, steps: int) -> None:
    """One rank of a 2-process run under torchrun: aquila's own parallelize() with env_type fsdp or pytorchDDP."""
    import torch
    import torch.distributed as dist

    from aquila.checkpoint import build_model
    from aquila.train.config import TrainConfig
    from aquila.train.distributed import make_backend, resolve_env
    from aquila.train.optim import build_optimizer

    cfg = TrainConfig(env_type=mode, lr=1e-4)
    env = resolve_env(cfg)
    backend = make_backend(env, cfg)
    backend.start()
    model = backend.parallelize(build_model(_args(vocab), seed=0))
    opt = build_optimizer(model, cfg)
    data = _data(vocab, batch, seq, steps)
    t0 = time.perf_counter()
    for ids in data:
        model(ids, labels=ids)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = (time.perf_counter() - t0) / steps
    rss = torch.tensor([_peak_rss_mb()])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if env.rank == 0:
        print("RESULT " + json.dumps({"peak_rss_mb": float(rss), "step_s": dt}), flush=True)
    dist.destroy_process_group()


def _sub(argv: list[str], env_extra: dict | None = None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    res = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"{argv}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _dist(mode: str, vocab: int, batch: int, seq: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    cmd += [
        "--dist-worker",
        mode,
        "--vocab",
        str(vocab),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--steps",
        str(steps),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeError(f"{mode}: {res.stderr[-2000:]}")
    return json.loads(line[len("RESULT ") :])


def matmul_peak_tflops() -> float:
    """Best fp32 matmul rate per CPU-second (sizes 1024 and 2048), comparable with tokens per CPU-second."""
    import torch

    best = 0.0
    for size in (1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(5):
            c0 = time.process_time()
            a @ b
            best = max(best, 2 * size**3 / max(time.process_time() - c0, 1e-9) / 1e12)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per eager row; the best is kept")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: CPU time is compute time)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (both implementations)")
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--dist-worker", choices=["fsdp", "pytorchDDP"], help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=16008, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.vocab, a.batch, a.seq, a.steps, a.warmup, a.compile, a.threads)))
        return 0
    if a.dist_worker:
        dist_worker(a.dist_worker, a.vocab, a.batch, a.seq, a.steps)
        return 0

    import torch
    import transformers

    from aquila.train.metrics import flops_per_token

    t_start = time.time()
    load = os.getloadavg()[0]
    torch.set_num_threads(a.threads)
    peak = matmul_peak_tflops()
    lines = [
        f"Machine: {os.cpu_count()} cores, {cpu_name()}, load average {load:.1f} at start (shared machine);"
        f" torch {torch.__version__}, transformers {transformers.__version__}; {a.threads} torch thread(s) per run.",
        f"Model: dim {SHAPES['dim']}, {SHAPES['n_layers']} layers, {SHAPES['n_heads']} heads; batch {a.batch} x seq"
        f" {a.seq}; AdamW lr 1e-4 betas (0.9, 0.95) wd 0.1, clip 1.0; best of {a.steps} steps after {a.warmup}"
        f" warm-up, best of {a.repeats} interleaved runs (compiled rows: 1). Measured fp32 matmul peak ({a.threads} thread(s), per CPU-second): {peak * 1000:.0f} GFLOP/s.",
        "",
        "| vocab | implementation | tokens/s (wall) | tokens per CPU-s | MFU vs matmul peak | peak RSS (MiB) | speed-up (CPU-s) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    common = ["--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    common += ["--threads", str(a.threads)]
    impls = [("hf", "transformers LlamaForCausalLM", []), ("ours", "aquila (fused CE, fused AdamW)", [])]
    if a.compile:
        impls.append(("ours", "aquila + torch.compile per block", ["--compile"]))
    for vocab in (16008, 100008):
        fpt = flops_per_token(_args(vocab), a.seq)
        best: dict[str, dict] = {}
        # Interleaved repeats, best kept: a neighbour's burst on this shared machine hits one run, not the pair.
        for rep in range(a.repeats):
            for impl, name, extra in impls:
                if extra and rep:
                    continue  # compiled rows once (compilation dominates their run time)
                r = _sub(["--worker", impl, "--vocab", str(vocab), *common, *extra])
                if name not in best or r["tokens_per_cpu_s"] > best[name]["tokens_per_cpu_s"]:
                    best[name] = r
        ref = None
        for _impl, name, _extra in impls:
            r = best[name]
            ref = ref or r
            mfu = r["tokens_per_cpu_s"] * fpt / (peak * 1e12)
            speed = r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"]
            lines.append(
                f"| {vocab:,} | {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} | {mfu * 100:.0f}% |"
                f" {r['peak_rss_mb']:,.0f} | {speed:.2f}x |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines), flush=True)
    dist_lines = ["", "2 processes (gloo, 1 thread each), vocab 100,008, batch 2 x seq 256 per rank:", ""]
    dist_lines += ["| env_type | per-rank peak RSS (MiB) | s/step |", "|---|---:|---:|"]
    for mode in ("pytorchDDP", "fsdp"):
        r = _dist(mode, 100008, 2, a.seq, 3)
        dist_lines.append(f"| {mode} | {r['peak_rss_mb']:,.0f} | {r['step_s']:.2f} |")
    dist_lines.append(f"\nTotal bench time {time.time() - t_start:.0f} s.")
    print("\n".join(dist_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
