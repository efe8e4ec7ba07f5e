"""What every part of bench/gpu_check.py shares: emitting result rows, the device, timing and memory helpers.

A part runs in its own process and prints each result as one `ROW {"name": ..., "value": ...}` line on stdout;
the orchestrator collects those lines, so a part that dies or runs out of time still keeps the rows it printed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROW_PREFIX = "ROW "


def row(name: str, value: str) -> None:
    print(ROW_PREFIX + json.dumps({"name": name, "value": value}), flush=True)


def error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {first}"


def guarded(name: str, fn: Callable[[], object]) -> object | None:
    """Run one measurement; a failure becomes an `error:` row under `name` and the part goes on."""
    import traceback

    try:
        return fn()
    except Exception as e:  # one broken measurement must not hide the others
        traceback.print_exc(file=sys.stderr)
        row(name, error_text(e))
        if "out of memory" in str(e).lower():
            free_cuda()
        return None


def free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Budget:
    """A part's deadline: sub-measurements that would not finish in time are reported as skipped."""

    deadline: float

    @classmethod
    def of(cls, seconds: float) -> Budget:
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, name: str, needed_s: float) -> bool:
        if self.left() >= needed_s:
            return True
        row(name, f"skipped: {self.left():.0f} s of the part's time budget left, needs about {needed_s:.0f} s")
        return False


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> str:
    """Peak allocated (and reserved) memory on CUDA; the process's max RSS elsewhere."""
    import torch

    if device.type == "cuda":
        alloc = torch.cuda.max_memory_allocated(device) / 2**30
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
        return f"{alloc:.1f} GiB allocated ({reserved:.1f} GiB reserved)"
    from aquila.train.metrics import peak_memory_mb

    return f"{peak_memory_mb(device) / 1024:.2f} GiB max RSS (CPU)"


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
