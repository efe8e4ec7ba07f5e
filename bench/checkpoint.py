"""Bytes written and seconds per training checkpoint, 2 gloo ranks, ~100M shape: today's Saver (from git, the weights
twice from rank 0: model.safetensors + pytorch_model.bin) against the new one, whose step holds the weights once:
FlagAI's pytorch_model.bin from rank 0 (a save_interval step, the default) or every rank's own shard (model/, the
steps between save_full_interval). Interleaved rounds, the same process group; weights only (save_optim False,
FlagAI's default), each step fsynced and given its manifest, as in training.

usage: python bench/checkpoint.py [--env fsdp|pytorchDDP] [--rounds 3] [--today-rev 8465660] [--dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = {"dim": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 16008, "multiple_of": 256, "max_seq_len": 1024}
MODES = ("today", "new_full", "new_sharded")


def old_checkpointing(rev: str):
    """aquila/train/checkpointing.py as it was at `rev`, imported under another name (it uses the same helpers)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:aquila/train/checkpointing.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_checkpointing.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_checkpointing", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def worker(opts) -> None:
    import torch

    from aquila.checkpoint import build_model
    from aquila.config import ModelArgs
    from aquila.train import checkpointing
    from aquila.train.backends import make_backend
    from aquila.train.config import TrainConfig
    from aquila.train.distributed import barrier, resolve_env, shutdown

    if os.environ.get("BENCH_PROFILE"):
        import functools

        from aquila.train import distributed

        def timed(owner, name):
            f = getattr(owner, name)

            @functools.wraps(f)
            def g(*a, **k):
                t = time.perf_counter()
                r = f(*a, **k)
                print(f"  rank{os.environ['RANK']} {name}: {time.perf_counter() - t:.2f}s", flush=True)
                return r

            setattr(owner, name, g)

        for name in ("save_weights", "write_manifest", "_fsync_tree", "save_model_shards"):
            timed(checkpointing, name)
        timed(distributed.FSDPBackend, "full_state_dict")
    base = Path(opts.dir)
    cfgs = {
        mode: TrainConfig(
            env_type=opts.env,
            save_dir=str(base / mode),
            save_interval=1,
            num_checkpoints=1,
            save_full_interval={"new_sharded": 10**9}.get(mode),
        )  # fmt: skip
        for mode in MODES
    }
    env = resolve_env(cfgs["today"])
    backend = make_backend(env, cfgs["today"])
    backend.start()
    args = ModelArgs(**SHAPE)
    model = backend.parallelize(build_model(args, env.device, torch.float32, seed=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    old = old_checkpointing(opts.today_rev)
    savers = {
        "today": old.Saver(cfgs["today"], backend, args, None),
        "new_full": checkpointing.Saver(cfgs["new_full"], backend, args, None),
        "new_sharded": checkpointing.Saver(cfgs["new_sharded"], backend, args, None),
    }
    step = 0
    for r in range(-1, opts.rounds):  # round -1 warms up (first writes, allocator) and is not reported
        for mode in MODES[r % 3 :] + MODES[: r % 3]:  # each mode takes each place in the order in turn
            step += 1
            state = {"iteration": step, "consumed_samples": 0, "global_batch_size": 1, "optimizer_state": False}
            barrier()
            t0 = time.perf_counter()
            path = savers[mode].save(step, model, optimizer, state)
            seconds = time.perf_counter() - t0
            if env.is_main and r < 0:
                shutil.rmtree(path)
            elif env.is_main:
                files = [p for p in path.rglob("*") if p.is_file()]
                weights = sum(p.stat().st_size for p in files if p.suffix in (".bin", ".safetensors", ".distcp"))
                row = {"round": r, "mode": mode, "seconds": round(seconds, 3), "bytes": sum(p.stat().st_size for p in files),
                       "weight_bytes": weights, "files": sorted(f"{p.relative_to(path)} {p.stat().st_size / 1e6:.0f}MB" for p in files if p.stat().st_size > 1e6)}  # fmt: skip
                print(json.dumps(row), flush=True)
                shutil.rmtree(path)
            barrier()
    if env.is_main:
        print(json.dumps({"params": args.num_params(), "world_size": env.world_size, "env": opts.env}), flush=True)
    shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="fsdp", choices=["fsdp", "pytorchDDP"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--today-rev", default="8465660", help="the commit whose Saver is 'today'")
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        worker(opts)
        return
    with tempfile.TemporaryDirectory(dir=opts.dir) as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", "--env", opts.env, "--rounds", str(opts.rounds), "--today-rev", opts.today_rev, "--dir", tmp]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
    print("\n".join(line for line in out.stdout.splitlines() if line.startswith("  rank")))  # BENCH_PROFILE
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    meta = rows.pop()
    print(f"{meta['params'] / 1e6:.1f}M params, {meta['world_size']} gloo ranks, {opts.env}; uptime:"
          f" {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")  # fmt: skip
    for row in rows:
        print(
            f" round {row['round']} {row['mode']:12s} {row['bytes'] / 1e6:8.1f} MB {row['seconds']:7.2f} s  {row['files']}"
        )
    mean = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    for m in MODES:
        bytes_, secs = mean[m][0]["bytes"], sum(r["seconds"] for r in mean[m]) / len(mean[m])
        ratio_b, ratio_t = (
            bytes_ / mean["today"][0]["bytes"],
            secs / (sum(r["seconds"] for r in mean["today"]) / len(mean["today"])),
        )
        print(f"{m:12s} {bytes_ / 1e6:8.1f} MB per save ({ratio_b:.2f}x) {secs:6.2f} s mean ({ratio_t:.2f}x)")


if __name__ == "__main__":
    main()
