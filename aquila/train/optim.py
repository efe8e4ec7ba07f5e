"""AdamW with FlagAI's decay groups, its learning-rate schedules, and a dynamic fp16 loss scaler.

The schedule counts optimizer iterations (global batches), not micro-steps as FlagAI's did, so changing
gradient_accumulation_steps does not stretch the warm-up.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aquila.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """FlagAI's groups: parameters of modules whose class name contains "norm", and biases, get no decay."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if is_norm or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        from aquila.errors import AquilaError

        raise AquilaError("no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    # The fused kernel (one pass per tensor instead of ~10 foreach passes) where torch has it for these tensors;
    # sharded DTensor parameters (FSDP2) keep the foreach implementation.
    fused = all(p.device.type in ("cpu", "cuda") and not hasattr(p, "device_mesh") for p in params)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def warmup_iters(cfg: TrainConfig, total: int) -> int:
    return cfg.warm_up_iters if cfg.warm_up_iters > 0 else int(cfg.warm_up * total)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate for optimizer iteration `step` (0-based) out of `total`.

    Warm-up is linear from warmup_start_lr, reaching the peak at the end of warm-up (FlagAI's BMTrain
    schedulers start at n=0, so its first step used lr 0; ours uses peak/warmup). Then `linear` decays to 0 at
    `total`, anything else (FlagAI's default "cosine") is Cosine10PP: cosine down to 10% of the peak. Without any
    warm-up setting FlagAI creates no scheduler: the lr is constant.
    """
    peak = cfg.lr
    if cfg.warm_up <= 0 and cfg.warm_up_iters <= 0:
        return peak
    warm = warmup_iters(cfg, total)
    n = step + 1
    if n <= warm:
        return max(peak * n / warm, cfg.warmup_start_lr)
    if cfg.bmt_lr_decay_style == "linear":
        return max(0.0, peak * (total - n) / max(1, total - warm))
    progress = min(1.0, (n - warm) / max(1, total - warm))
    return max(0.0, 0.1 * peak + 0.9 * peak * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class LossScaler:
    """Dynamic loss scale for fp16 (bmt_loss_scale, bmt_loss_scale_steps): halve on overflow, double after
    `window` clean steps. With `enabled=False` the scale is 1 and nothing changes."""

    def __init__(self, scale: float, window: int, enabled: bool) -> None:
        self.enabled = enabled
        self.scale = float(scale) if enabled else 1.0
        self.window = max(1, window)
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale = max(1.0, self.scale / 2)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps >= self.window:
                self.scale *= 2
                self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled:
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])
