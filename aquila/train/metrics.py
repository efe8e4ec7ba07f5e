"""Rank-0 logging: FlagAI's iteration line plus tokens/s, MFU and peak memory; metrics.jsonl; TensorBoard; tqdm."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from aquila.config import ModelArgs
from aquila.optional import require
from aquila.train.config import TrainConfig
from aquila.train.distributed import DistEnv


def flops_per_token(args: ModelArgs, seq_length: int) -> float:
    """nanoGPT's estimate: 6N + 12 L H Q T, N = parameters that do matmuls (the embedding lookup does not).

    Forward is 2N + the attention matmuls; backward twice that. With LoRA the frozen weights still cost their
    forward and input-gradient matmuls, so this stays an upper estimate there.
    """
    n = args.num_params() - args.vocab_size * args.dim
    attn = 12 * args.n_layers * args.n_heads * args.head_dim * seq_length
    return 6 * n + attn


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024) -> float:
    """Best-of-a-few dense matmul throughput on this process's device, TFLOP/s (a realistic MFU denominator)."""
    gen = torch.Generator(device=device).manual_seed(0)  # leave the global RNG alone (exact resume)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    best = math.inf
    reps = 8 if device.type == "cpu" else 50
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 * reps / best / 1e12


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def format_line(step: int, total: int, rec: dict[str, Any], accum: int) -> str:
    """FlagAI's log line, then ours."""
    line = (
        f" iteration {step:8d}/{total:8d} | elapsed time per iteration (ms): {rec['ms_per_iter']:.1f} |"
        f" learning rate {rec['lr']:.3E} | loss {rec['loss']:.6E} | perplexity {rec['ppl']:.6E} |"
        f" loss scale {rec['loss_scale']:.1f} | grad norm {rec['grad_norm']:.6f} |"
        f" gradient_accumulation {accum}/{accum} |"
        f" tokens/s {rec['tokens_per_s']:.0f} | MFU {rec['mfu'] * 100:.2f}% | peak mem {rec['peak_mem_mb']:.0f} MiB"
    )
    if rec.get("nan_skipped"):
        line += f" | skipped (non-finite) {rec['nan_skipped']}"
    return line


class MetricsLogger:
    """Accumulates per-iteration numbers and writes one record every `log_interval` iterations (rank 0 only)."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        total_steps: int,
        start_step: int,
        flops_per_token: float,
        peak_flops: float,
    ) -> None:
        enabled = self.enabled = env.is_main
        self.log_interval, self.total, self.accum = cfg.log_interval, total_steps, cfg.gradient_accumulation_steps
        self.device = env.device
        # flops_per_token: per process share (already divided by the number of processes)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.path = Path(cfg.save_dir) / "metrics.jsonl" if (enabled and cfg.save_dir) else None
        tensorboard_dir = str(Path(cfg.tensorboard_dir) / cfg.experiment_name) if cfg.tensorboard else None
        self._reset(time.perf_counter())
        self.logged_losses: list[float] = []  # the loss of each window logged by this process
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_after(self.path, start_step)
        if tensorboard_dir:
            require("tensorboard", "tensorboard: True")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="it", dynamic_ncols=True, leave=False)

    def _reset(self, now: float) -> None:
        self._t0, self._iters, self._tokens = now, 0, 0.0  # timing: iterations run by this process
        self._n, self._loss, self._norm, self._skipped = 0, 0.0, 0.0, 0  # the window's averages

    def window_state(self) -> dict[str, Any]:
        """The open logging window's sums, for a checkpoint: a resumed run then logs the same averages as an
        uninterrupted one (floats survive JSON exactly)."""
        return {"log_interval": self.log_interval, "n": self._n, "loss": self._loss, "norm": self._norm,
                "skipped": self._skipped}  # fmt: skip

    def restore_window(self, saved: dict[str, Any] | None) -> None:
        """Reopen the window saved with a checkpoint (ignored when log_interval changed: other boundaries)."""
        if saved and saved.get("log_interval") == self.log_interval:
            self._n, self._loss, self._norm, self._skipped = saved["n"], saved["loss"], saved["norm"], saved["skipped"]

    def step(
        self, step: int, loss: float, grad_norm: float, lr: float, loss_scale: float, skipped: bool, tokens: float
    ) -> None:
        """Record iteration `step` (1-based count of iterations done) that processed `tokens` tokens in all."""
        if not self.enabled:
            return
        self._tokens += tokens
        self._iters += 1
        if skipped:
            self._skipped += 1
        else:
            self._n += 1
            self._loss += loss
            self._norm += grad_norm
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_interval and step != self.total:
            return
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        dt = elapsed / max(1, self._iters)
        mean_loss = self._loss / self._n if self._n else float("nan")
        rec = {
            "step": step,
            "loss": mean_loss,
            "ppl": math.exp(min(mean_loss, 80.0)) if math.isfinite(mean_loss) else float("nan"),
            "lr": lr,
            "grad_norm": self._norm / self._n if self._n else float("nan"),
            "loss_scale": loss_scale,
            "ms_per_iter": dt * 1000,
            "tokens_per_s": self._tokens / elapsed,
            "mfu": self._tokens * self.flops_per_token / elapsed / self.peak_flops if self.peak_flops > 0 else 0.0,
            "peak_mem_mb": peak_memory_mb(self.device),
            "nan_skipped": self._skipped,
            "time": time.time(),
        }
        self._emit(format_line(step, self.total, rec, self.accum), rec, "train")
        self.logged_losses.append(mean_loss)
        self._reset(now)

    def eval(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 80.0))
        rec = {"step": step, "valid_loss": loss, "valid_ppl": ppl, "time": time.time()}
        self._emit(f" validation at iteration {step:8d} | loss {loss:.6E} | perplexity {ppl:.6E}", rec, "valid")

    def message(self, text: str) -> None:
        if self.enabled:
            self._print(text)

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _emit(self, line: str, rec: dict[str, Any], kind: str) -> None:
        self._print(line)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"kind": kind, **rec}) + "\n")
        if self.writer is not None:
            for key, value in rec.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, rec["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records past the resumed step (a killed run may have logged beyond its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    from aquila.io_utils import write_text_atomic

    write_text_atomic(path, "".join(f"{line}\n" for line in keep))
