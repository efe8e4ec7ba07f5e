"""Cross-entropy over the output projection, chunked so the [tokens, vocab] fp32 logits never exist at once.

With Aquila's 100,008-entry vocabulary the logits dominate training memory. The forward pass walks the tokens
in chunks, and because the loss is a scalar it computes the gradients for the hidden states and the output
weight in the same pass; backward only scales them. One matmul pass fewer than recomputation would need.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk (128 MiB in fp32)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, reduction: str):
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != IGNORE_INDEX
        count = valid.sum()
        scale = (
            1.0 / count.clamp(min=1).to(torch.float32) if reduction == "mean" else torch.ones((), device=hidden.device)
        )
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = max(1, _CHUNK_ELEMENTS // vocab)
        for start in range(0, n, step):
            h = hidden[start : start + step]
            y = labels[start : start + step]
            ok = valid[start : start + step]
            logits = (h @ weight.t()).float()
            target = logits.gather(1, y.clamp(min=0).unsqueeze(1))
            row_max = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(row_max).exp_()  # in place: one exp serves both the loss and its gradient
            denom = exp.sum(dim=1, keepdim=True)
            total += ((denom.log() + row_max - target).squeeze(1) * ok).sum()
            if need_grad:
                # d loss / d logits = softmax - onehot, zero on ignored rows, times the reduction scale.
                weight_rows = (ok.to(exp.dtype) * scale).unsqueeze(1)
                probs = exp.mul_(weight_rows / denom)
                rows = torch.arange(h.shape[0], device=h.device)
                probs[rows, y.clamp(min=0)] -= weight_rows.squeeze(1)
                grad_hidden[start : start + step] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
                grad_weight.addmm_(probs.t(), h.float())
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype),
            grad_weight * grad_output.to(grad_weight.dtype),
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` (IGNORE_INDEX rows skipped).

    hidden: [n, dim]; weight: [vocab, dim]; labels: [n]. reduction: "mean" over counted rows, or "sum".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, reduction)
