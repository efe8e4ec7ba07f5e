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
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, ref_h, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w.grad, ref_w, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("n", [23, 35, 36])
def test_matches_full_logits_over_several_chunks(monkeypatch, n):
    monkeypatch.setattr(aquila.loss, "_CHUNK_ELEMENTS", 12 * 50)  # 12 rows a chunk at most: 2 or 3 chunks
    h, w, y = _inputs(n, 50, 16)
    loss = fused_linear_cross_entropy(h, w, y)
    (loss * 3).backward()
    ref, ref_h, ref_w = _reference(h, w, y, "mean")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, ref_w, atol=1e-5, rtol=1e-5)


def test_bfloat16_matches_reference():
    h, w, y = _inputs(40, 300, 32, torch.bfloat16)
    loss = fused_linear_cross_entropy(h, w, y)
    (loss * 3).backward()
    ref, ref_h, ref_w = _reference(h, w, y, "mean")
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
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
