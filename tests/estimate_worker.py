"""Measure real training steps with the same tracker `aquila estimate` runs on fake tensors (one process of a
torchrun group, or alone). Prints one JSON line per configuration on rank 0.

usage: [torchrun --nproc-per-node N] estimate_worker.py MODEL_JSON SEQ CASE_JSON [CASE_JSON ...]
  MODEL_JSON: ModelArgs fields; CASE_JSON: TrainConfig fields (env_type, checkpoint_activations, batch_size, ...)
"""

from __future__ import annotations

import datetime
import json
import resource
import sys

import torch
import torch.distributed as dist

from aquila.config import ModelArgs
from aquila.train.config import TrainConfig
from aquila.train.estimate import Target, step_memory
from aquila.typed_config import from_dict


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    args = from_dict(ModelArgs, json.loads(argv[0]), "model")
    seq = int(argv[1])
    if "MASTER_ADDR" in __import__("os").environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    for case in argv[2:]:
        cfg = from_dict(TrainConfig, {"max_steps": 1, **json.loads(case)}, "case")
        before = rss_bytes()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem = step_memory(cfg, args, Target(world, "cpu", None, 0), seq, fake=False)
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # RSS growth: how far this step pushed the process's high-water mark above what it held before it.
        growth = max(0, peak_after - max(before, peak_before)) if peak_after > peak_before else 0
        if dist.get_rank() == 0:
            print(json.dumps({"case": json.loads(case), "peak": mem.peak, "phases": mem.phases,
                              "rss_growth": growth, "rss_before": before}), flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
