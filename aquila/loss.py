"""Cross-entropy over the output projection, chunked so the [tokens, vocab] fp32 logits never exist at once.

With Aquila's 100,008-entry vocabulary the logits dominate training memory. The forward pass walks the tokens
in equal chunks, and because the loss is a scalar it computes the gradients for the hidden states and the output
weight in the same pass; backward only scales them. One matmul pass fewer than recomputation would need.

The chunk work is bound by memory bandwidth, which a second thread barely adds to, so each chunk makes as few
passes over its [rows, vocab] block as it can: one reused buffer (no fresh pages per chunk), the fused
in-place log_softmax (each row stays in cache), one in-place exp, and the per-row loss weights applied to the
small [rows, dim] operands of the two gradient matmuls instead of to the block.
"""

from __future__ import annotations

import torch

from aquila.constants import IGNORE_INDEX

_CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk (128 MiB in fp32)


def chunk_rows(n: int, vocab: int) -> int:
    """Rows per chunk: within _CHUNK_ELEMENTS, and equal-sized, so no thin last chunk re-reads the weight."""
    chunks = -(-n // max(1, _CHUNK_ELEMENTS // vocab))
    return max(1, -(-n // chunks))


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if a.dtype == b.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return out.copy_(a.to(b.dtype) @ b)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, reduction: str, grad_enabled: bool):
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != IGNORE_INDEX
        targets = labels.clamp(min=0).unsqueeze(1)
        count = valid.sum().clamp(min=1).to(torch.float32)
        # d loss / d row loss: 0 on ignored rows, 1/count (mean) or 1 (sum) elsewhere.
        row_weights = valid.to(torch.float32) / count if reduction == "mean" else valid.to(torch.float32)
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = chunk_rows(n, vocab)
        buffer = torch.empty((min(step, n), vocab), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, step):
            end = min(start + step, n)
            h, target, row_weight = hidden[start:end], targets[start:end], row_weights[start:end].unsqueeze(1)
            logp = _mm_into(h, weight.t(), buffer[: end - start])
            torch.log_softmax(logp, dim=1, out=logp)
            total -= (logp.gather(1, target) * row_weight).sum()
            if need_grad:
                # d loss / d logits = row_weight * (softmax - onehot); the row weights go on the small operands.
                probs = logp.exp_().scatter_add_(1, target, torch.full(target.shape, -1.0, device=target.device))
                _mm_into(probs, weight, grad_hidden[start:end]).mul_(row_weight.to(hidden.dtype))
                h_weighted = h.float() * row_weight
                if start == 0:
                    torch.mm(probs.t(), h_weighted, out=grad_weight)
                else:
                    grad_weight.addmm_(probs.t(), h_weighted)
        # Plain attributes, not save_for_backward: backward scales them in place and hands them to autograd,
        # so the [vocab, dim] gradient is neither copied nor allocated twice.
        ctx.grads = (grad_hidden, grad_weight.to(weight.dtype)) if need_grad else None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward called twice (retain_graph is not supported)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        return grad_hidden.mul_(grad_output), grad_weight.mul_(grad_output), None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` (IGNORE_INDEX rows skipped).

    hidden: [n, dim]; weight: [vocab, dim]; labels: [n]. reduction: "mean" over counted rows, or "sum".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    # Under no_grad (evaluation) the two gradient matmuls are skipped.
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, reduction, torch.is_grad_enabled())
