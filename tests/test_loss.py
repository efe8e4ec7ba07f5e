"""The chunked fused cross-entropy against F.cross_entropy on the full logits, at the chunk sizes training uses."""

import pytest
import torch
import torch.nn.functional as F

import aquila.loss
from aquila.loss import IGNORE_INDEX, chunk_rows, fused_linear_cross_entropy


def _inputs(n: int, vocab: int, dim: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, dim, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, dim, generator=gen) * 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[::7] = IGNORE_INDEX
    return h, w, y


def _reference(h, w, y, reduction):
    """Logits in the inputs' dtype, then fp32, as the fused loss (and transformers) compute them."""
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = F.cross_entropy((h2 @ w2.t()).float(), y, ignore_index=IGNORE_INDEX, reduction=reduction)
    (loss * 3).backward()
    return loss, h2.grad, w2.grad


EPS32 = torch.finfo(torch.float32).eps


def _rounding_bounds(h, w, y, reduction):
    """Elementwise bounds on fp32 rounding differences between two correct ways of computing (loss, 3 dL/dh, 3 dL/dw).

    Kernels (MKL, oneDNN; AVX2, AVX-512) sum in different orders, so each bound is eps * sqrt(terms) (the spread of a
    sum of `terms` rounded additions, each relative error <= eps, with random signs) times the sum of the magnitudes
    of what is added. With z = h @ w.T (n rows, V = vocab, D = dim), p = softmax(z), r = the row weights (1 or
    1/count) and onehot(y):
    - each row's log-sum-exp sums V exps: a relative error eps*sqrt(V) in the sum is that absolute error in its log,
      and in every p of the row relatively; a logit is a D-term dot product, its error eps*sqrt(D)*sum|h_d w_d|;
    - dL/dh = r * (p @ w - w_y): V terms of magnitude p|w| (+ |w_y|), so eps*sqrt(V) * r*(p@|w| + |w_y|), plus p's
      own relative error (the same eps*sqrt(V) and the logit's);
    - dL/dw = (r*(p - onehot)).T @ h: n terms of magnitude r*p*|h| (+ r*|h| on the label rows), summed over chunks,
      so eps*(sqrt(n) + sqrt(V) + logit error) * that magnitude;
    - the loss sums n rows of r*(lse - z_y): each row off by its lse's eps*sqrt(V) and its logit's error, and the
      n-term sum adds eps*sqrt(n) * sum r*(|lse| + |z_y|).
    The slack factor 2 covers the few rounded operations around each sum (max subtraction, exp, scaling by r, 3).
    A real bug (a gradient off by a scale, a dropped chunk, the wrong reduction) is off by ~|gradient| >> these.
    """
    h, w = h.detach().float(), w.detach().float()
    n, dim, vocab = h.shape[0], h.shape[1], w.shape[0]
    valid = y != IGNORE_INDEX
    r = valid.float() / (valid.sum() if reduction == "mean" else 1)
    z = h @ w.t()
    p = torch.softmax(z, dim=1)
    onehot = torch.zeros_like(p).scatter_(1, y.clamp(min=0).unsqueeze(1), 1.0)
    logit_err = EPS32 * dim**0.5 * (h.abs() @ w.abs().t()).max(dim=1).values  # per row
    p_rel = EPS32 * vocab**0.5 + logit_err  # relative error of each p in the row
    slack = 2.0
    lse = torch.logsumexp(z, dim=1)
    loss_terms = r * (lse.abs() + z.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1).abs())
    loss_bound = slack * ((r * p_rel).sum() + EPS32 * (n**0.5 + 1) * loss_terms.sum())
    grad_h_mag = 3 * r.unsqueeze(1) * (p @ w.abs() + onehot @ w.abs())
    grad_h_bound = slack * (EPS32 * vocab**0.5 + p_rel.unsqueeze(1)) * grad_h_mag
    grad_w_mag = 3 * (p + onehot).t() @ (r.unsqueeze(1) * h.abs())
    grad_w_bound = slack * (EPS32 * n**0.5 + p_rel.max()) * grad_w_mag
    return loss_bound, grad_h_bound, grad_w_bound


def _assert_within(actual, expected, bound, what):
    err = (actual.detach().float() - expected.detach().float()).abs()
    over = err > bound
    assert not over.any(), (
        f"{what}: {int(over.sum())} of {err.numel()} elements beyond the rounding bound; worst error "
        f"{err.max().item():.3g}, worst error/bound {(err / bound).max().item():.3g}"
    )


def test_chunks_are_equal_and_within_budget():
    per_chunk = aquila.loss._CHUNK_ELEMENTS // 100008  # 335 rows of Aquila's vocabulary
    assert chunk_rows(1020, 100008) == 255  # 4 chunks of 255, not 335 + 335 + 335 + 15
    assert chunk_rows(2 * per_chunk + 1, 100008) == 224
    assert chunk_rows(per_chunk, 100008) == per_chunk
    assert chunk_rows(10, 16008) == 10
    for n in (1, 334, 335, 336, 1020, 4096):
        rows = chunk_rows(n, 100008)
        assert rows <= per_chunk and -(-n // rows) == -(-n // per_chunk)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_full_logits_at_aquila_vocab(reduction):
    """Real chunk size at vocab 100,008: 671 rows are 3 equal chunks of 224 (one would have been 1 row)."""
    h, w, y = _inputs(2 * (aquila.loss._CHUNK_ELEMENTS // 100008) + 1, 100008, 16)
    loss = fused_linear_cross_entropy(h, w, y, reduction)
    (loss * 3).backward()
    ref, ref_h, ref_w = _reference(h, w, y, reduction)
    loss_bound, h_bound, w_bound = _rounding_bounds(h, w, y, reduction)  # derived there, not from one machine
    _assert_within(loss, ref, loss_bound, "loss")
    _assert_within(h.grad, ref_h, h_bound, "hidden gradient")
    _assert_within(w.grad, ref_w, w_bound, "weight gradient")
    # The bounds are far tighter than a real bug: a gradient 0.1% off in scale, the other reduction's
    # gradient, or one chunk's rows dropped all fail them.
    count = int((y != IGNORE_INDEX).sum())
    wrong = {
        "0.1% scale": ref_h * 1.001,
        "other reduction": ref_h * (count if reduction == "mean" else 1 / count),
        "last chunk dropped": torch.cat([ref_h[: 2 * 224], torch.zeros_like(ref_h[2 * 224 :])]),
    }
    for name, bad in wrong.items():
        with pytest.raises(AssertionError, match="beyond the rounding bound"):
            _assert_within(bad, ref_h, h_bound, name)
    with pytest.raises(AssertionError, match="beyond the rounding bound"):
        _assert_within(ref_w * 1.001, ref_w, w_bound, "0.1% scale")


@pytest.mark.parametrize("n", [23, 35, 36])
def test_matches_full_logits_over_several_chunks(monkeypatch, n):
    monkeypatch.setattr(aquila.loss, "_CHUNK_ELEMENTS", 12 * 50)  # 12 rows a chunk at most: 2 or 3 chunks
    h, w, y = _inputs(n, 50, 16)
    loss = fused_linear_cross_entropy(h, w, y)
    (loss * 3).backward()
    ref, ref_h, ref_w = _reference(h, w, y, "mean")
    for got, want, bound, what in zip(
        (loss, h.grad, w.grad), (ref, ref_h, ref_w), _rounding_bounds(h, w, y, "mean"), "lhw"
    ):
        _assert_within(got, want, bound, what)


def test_bfloat16_matches_reference():
    h, w, y = _inputs(40, 300, 32, torch.bfloat16)
    loss = fused_linear_cross_entropy(h, w, y)
    (loss * 3).backward()
    ref, ref_h, ref_w = _reference(h, w, y, "mean")
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: each gradient is rounded to bf16 once at the end, so two correct results can be
    # one ulp apart, at most 2**-7 = 7.8e-3 relative (rtol 1e-2). The bf16 logits (chunked here, whole there) may
    # also round one ulp apart (|z| * 2**-8, ~1e-2 for |z| ~ 3): each p moves ~1% and an element near 0, a sum of
    # ~300 such terms p * |w| (x 3), by ~1e-3 absolute (atol).
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, ref_h, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(w.grad, ref_w, atol=1e-3, rtol=1e-2)


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    h, w, _ = _inputs(9, 50, 8)
    loss = fused_linear_cross_entropy(h, w, torch.full((9,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_no_grad_skips_the_gradient_matmuls(monkeypatch):
    calls = []
    real = aquila.loss._mm_into
    monkeypatch.setattr(aquila.loss, "_mm_into", lambda *a: calls.append(1) or real(*a))
    h, w, y = _inputs(12, 50, 8)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, y)
    assert len(calls) == 1  # the logits only
    torch.testing.assert_close(loss, _reference(h, w, y, "mean")[0])


def test_second_backward_through_retained_graph_raises():
    h, w, y = _inputs(12, 50, 8)
    loss = fused_linear_cross_entropy(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward called twice"):
        loss.backward()
