"""`aquila estimate` against measured runs at a ~100M-parameter shape (and the tiny model), 1 and 2 gloo processes,
pytorchDDP and fsdp, with and without activation checkpointing: the estimate (fake tensors), the same MemTracker
on the real run, and the process's peak RSS growth beside it.

usage: python bench/estimate.py [--shape 100m|tiny] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aquila.config import ModelArgs  # noqa: E402
from aquila.train.config import TrainConfig  # noqa: E402
from aquila.train.estimate import Target, estimate  # noqa: E402
from aquila.typed_config import from_dict  # noqa: E402

SHAPES = {
    "100m": {"dim": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 16008, "multiple_of": 256, "max_seq_len": 1024},
    "tiny": {"dim": 256, "n_layers": 4, "n_heads": 8, "vocab_size": 16008, "multiple_of": 32, "max_seq_len": 512},
}
CASES = [
    {"env_type": env, "batch_size": 2, "checkpoint_activations": ckpt}
    for env in ("pytorchDDP", "fsdp")
    for ckpt in (False, True)
]
WORKER = ROOT / "tests" / "estimate_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(shape: dict, seq: int, world: int, case: dict) -> dict:
    """One case in fresh processes, so that the RSS growth is this step's alone."""
    cmd = [sys.executable, str(WORKER), json.dumps(shape), str(seq), json.dumps(case)]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={free_port()}", *cmd[1:]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return next(json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=SHAPES, default="100m")
    p.add_argument("--seq", type=int, default=256)
    a = p.parse_args()
    shape = SHAPES[a.shape]
    args = from_dict(ModelArgs, shape, "shape")
    print(f"shape {a.shape}: {args.num_params() / 1e6:.1f}M params, micro-batch 2 x seq {a.seq}, fp32, CPU (gloo)")
    print(f"{'ranks':>5} {'env_type':<11} {'ckpt':<5} {'estimate MiB':>13} {'measured MiB':>13} {'error':>7}"
          f" {'RSS growth MiB':>15}")  # fmt: skip
    for world in (1, 2):
        for row in (measure(shape, a.seq, world, case) for case in CASES):
            cfg = from_dict(TrainConfig, {"max_steps": 1, **row["case"]}, "case")
            est = estimate(cfg, args, Target(world, "cpu", None, 0), a.seq).peak
            case = row["case"]
            print(f"{world:>5} {case['env_type']:<11} {str(case['checkpoint_activations']):<5} {est / 2**20:>13.1f}"
                  f" {row['peak'] / 2**20:>13.1f} {est / row['peak'] - 1:>+7.1%} {row['rss_growth'] / 2**20:>15.1f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
