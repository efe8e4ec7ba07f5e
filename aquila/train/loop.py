"""The training loop shared by pretraining and SFT (nanoGPT-like: one function per concern, no callbacks).

Loss scaling: the loss of a global batch is the mean over all its target tokens, on every rank and across
micro-steps. Each micro-step backpropagates mean_micro * n_micro * world / n_global, so the summed (DDP/FSDP
average the gradients over ranks) gradient equals the big-batch gradient. FlagAI summed per-micro-step means,
which made accumulation multiply the learning rate.
"""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aquila.errors import AquilaError
from aquila.train.batches import GlobalBatches, count_targets
from aquila.train.config import TrainConfig
from aquila.train.distributed import Backend, DistEnv, all_reduce_sum, any_rank
from aquila.train.optim import LossScaler, lr_at, set_lr

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after writing a checkpoint; rerun to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop stops at the next step boundary. Later signals (say during the save) are
    absorbed, so they cannot interrupt the checkpoint write."""

    signal_name: str | None = None

    def _handle(self, signum: int, _frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass
class TrainState:
    step: int = 0  # iterations (global batches) done
    consumed_samples: int = 0
    nan_consecutive: int = 0
    nan_total: int = 0
    best_eval_loss: float | None = None
    best_iteration: int | None = None
    stopped_by: str | None = None  # the signal that stopped the run early


@dataclass
class Trainer:
    cfg: TrainConfig
    backend: Backend
    model: nn.Module  # as wrapped by the backend
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    train_batches: GlobalBatches
    valid_batches: GlobalBatches | None
    valid_steps: int
    total_steps: int
    saver: Any | None  # checkpointing.Saver
    logger: Any  # metrics.MetricsLogger
    state: TrainState
    stop: StopFlag = field(default_factory=StopFlag)
    last_tokens: float = 0.0  # tokens (padding included) in the last global batch, for tokens/s and MFU
    last_save: tuple[int, Path] | None = None  # (step, path) of the last checkpoint this process wrote
    seq_length: int | None = None  # recorded in checkpoints (the perplexity window default)

    @property
    def env(self) -> DistEnv:
        return self.backend.env

    def train_step(self, step: int) -> tuple[float, float, str]:
        """One global batch. Returns (loss, grad norm, status): status is "ok", "nan" or "overflow"."""
        device, world = self.env.device, self.env.world_size
        batches = self.train_batches.micro_batches(step)
        counts = [count_targets(b["labels"]) for b in batches]
        tokens = float(sum(b["input_ids"].numel() for b in batches))
        sums = torch.tensor([float(sum(counts)), tokens], dtype=torch.float64, device=device)
        n_global, self.last_tokens = all_reduce_sum(sums).tolist()
        if n_global == 0:
            raise AquilaError(f"iteration {step + 1}: the global batch has no target tokens (all labels ignored)")
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        last = len(batches) - 1
        for m, (batch, n) in enumerate(zip(batches, counts)):
            ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with self.backend.gradient_sync(self.model, sync=m == last):
                with self.backend.autocast():
                    loss = self.model(ids, labels=labels)["loss"]
                factor = n * world / n_global * self.scaler.scale
                (loss * factor).backward()
            loss_sum += loss.detach().double() * n
        loss_value = all_reduce_sum(loss_sum).item() / n_global
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_value, float("nan"), "nan"
        if self.scaler.enabled:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else math.inf
        norm_value = self.backend.clip_grad_norm(self.model, self.optimizer, max_norm)
        if not math.isfinite(norm_value):
            self.optimizer.zero_grad(set_to_none=True)
            status = "overflow" if self.scaler.enabled else "nan"
            self.scaler.update(overflow=True)
            return loss_value, norm_value, status
        set_lr(self.optimizer, lr_at(step, self.cfg, self.total_steps))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update(overflow=False)
        return loss_value, norm_value, "ok"

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `valid_steps` global validation batches (the same ones every time)."""
        self.model.eval()
        device = self.env.device
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for step in range(self.valid_steps):
            batch = self.valid_batches.micro_batch(step, 0)
            labels = batch["labels"].to(device)
            n = count_targets(labels)
            with self.backend.autocast():
                loss = self.model(batch["input_ids"].to(device), labels=labels)["loss"]
            total += torch.stack([loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=device)])
        self.model.train()
        loss_sum, count = all_reduce_sum(total).tolist()
        return loss_sum / max(count, 1.0)

    def checkpoint_state(self) -> dict:
        s = self.state
        return {
            "iteration": s.step,
            "consumed_samples": s.consumed_samples,
            "global_batch_size": self.train_batches.global_batch_size,
            "batch_size": self.cfg.batch_size,
            "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
            "world_size": self.env.world_size,
            "env_type": self.env.env_type,
            "total_iterations": self.total_steps,
            "loss_scale": self.scaler.state_dict(),
            # False before the first optimizer step: DCP would fake a step to save an empty Adam state
            "optimizer_state": bool(self.optimizer.state),
            "nan_skipped_total": s.nan_total,
            "best_eval_loss": s.best_eval_loss,
            "best_iteration": s.best_iteration,
            "seq_length": self.seq_length,
            "log_window": self.logger.window_state(),
        }

    def save(self, prune: bool = True) -> Path | None:
        """Write a checkpoint of the current step, once (a later call at the same step returns its path);
        `prune` False keeps all older checkpoints."""
        if self.saver is None:
            return None
        if self.last_save is None or self.last_save[0] != self.state.step:
            path = self.saver.save(self.state.step, self.model, self.optimizer, self.checkpoint_state(), prune)
            self.logger.message(f" saved checkpoint {path}")
            self.last_save = (self.state.step, path)
        return self.last_save[1]

    def fit(self) -> TrainState:
        cfg, s = self.cfg, self.state
        start = s.step
        bad_samples: list[str] = []
        while s.step < self.total_steps:
            if any_rank(self.stop.signal_name is not None, self.env):  # every rank stops on the same step
                return self._stop()
            step = s.step
            loss, norm, status = self.train_step(step)
            s.step += 1
            s.consumed_samples += self.train_batches.global_batch_size
            if status == "nan":
                s.nan_consecutive += 1
                s.nan_total += 1
                samples = self.train_batches.sample_indices(step)
                bad_samples.append(f"{s.step}: {_short(samples)}")
                self.logger.message(
                    f" iteration {s.step}: non-finite loss/gradients ({loss:.4g}, grad norm {norm:.4g}), step skipped"
                    f" ({s.nan_consecutive} in a row, {s.nan_total} in all); data samples {_short(samples, 64)}"
                )
            else:
                s.nan_consecutive = 0
            self.logger.step(
                s.step,
                loss,
                norm,
                lr_at(step, cfg, self.total_steps),
                self.scaler.scale,
                status != "ok",
                self.last_tokens,
            )
            if status == "nan" and cfg.nan_skip_limit and s.nan_consecutive >= cfg.nan_skip_limit:
                path = self.save(prune=False)  # the weights may be what went wrong: keep the older steps
                raise AquilaError(
                    f"stopping at iteration {s.step}: {s.nan_consecutive} consecutive non-finite steps"
                    f" (nan_skip_limit {cfg.nan_skip_limit}); data samples by iteration:"
                    f" {'; '.join(bad_samples[-s.nan_consecutive :])}; lower lr or check the data;"
                    f" checkpoint saved in {path} (older checkpoints are kept)"
                )
            if self.valid_batches is not None and self.valid_steps and s.step % cfg.eval_interval == 0:
                self._eval()
            if s.step % cfg.save_interval == 0:
                self.save()
        if s.step > start:
            self.save()
        return s

    def _stop(self) -> TrainState:
        s = self.state
        s.stopped_by = self.stop.signal_name or "a stop signal to another rank"
        self.logger.message(f" {s.stopped_by}: stopping at iteration {s.step} and saving a checkpoint")
        path = self.save()
        where = f"checkpoint {path}" if path else "no checkpoint (save_dir is not set)"
        self.logger.message(f" stopped by {s.stopped_by} at iteration {s.step}: {where}; exit status {PREEMPTED_EXIT}")
        return s

    def _eval(self) -> None:
        s = self.state
        loss = self.evaluate()
        self.logger.eval(s.step, loss)
        if s.best_eval_loss is None or loss < s.best_eval_loss:
            s.best_eval_loss, s.best_iteration = loss, s.step


def _short(indices: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"
