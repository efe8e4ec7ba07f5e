import pytest
import torch
import torch.nn.functional as F

from aquila.checkpoint import build_model
from aquila.config import ModelArgs
from aquila.errors import AquilaError
from aquila.loss import fused_linear_cross_entropy
from tests.conftest import tiny_args


def test_7b_shape_and_parameter_count_without_allocating():
    args = ModelArgs.from_name("aquila-7b")
    assert (args.dim, args.n_layers, args.n_heads, args.ffn_dim, args.vocab_size) == (4096, 32, 32, 11008, 100008)
    assert args.num_params() == 7_295_537_152
    with torch.device("meta"):
        from aquila.model import AquilaModel

        model = AquilaModel(args)
    assert sum(p.numel() for p in model.parameters()) == 7_295_537_152


def test_parameter_names_are_flagai():
    model = build_model(tiny_args(n_layers=1), seed=0)
    assert sorted(model.state_dict()) == sorted(
        [
            "tok_embeddings.weight",
            "norm.weight",
            "output.weight",
            *(f"layers.0.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")),
            *(f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")),
            "layers.0.attention_norm.weight",
            "layers.0.ffn_norm.weight",
        ]
    )


def cached(model, pool, tables, starts, chunks):
    """Logits [rows, width, V] of each row's chunk through the model's cached forward."""
    from aquila.inference.generate import forward_rows

    for t, s, c in zip(tables, starts, chunks):
        assert t.reserve(s + len(c))
    ends = [[(i, j) for i in range(len(chunks)) for j in range(max(len(c) for c in chunks))]]
    logits = forward_rows(model, pool, [(tables, starts, chunks)], ends)
    return logits.view(len(chunks), -1, logits.shape[-1])


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_heads=2)])
def test_kv_cache_decoding_matches_full_forward(overrides):
    from aquila.inference.kv_cache import BlockPool, BlockTable

    model = build_model(tiny_args(**overrides), seed=0).eval()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    pool = BlockPool.for_model(model, 64, block_size=4)  # blocks smaller than the prompt: rows span several
    with torch.no_grad():
        full = model(ids)["logits"]
        table = BlockTable(pool)
        steps = [cached(model, pool, [table], [0], [ids[0, :5].tolist()])]
        for t in range(5, 12):
            steps.append(cached(model, pool, [table], [t], [[int(ids[0, t])]]))
        # a chunk of several tokens after the prompt, in a second table
        other = BlockTable(pool)
        cached(model, pool, [other], [0], [ids[0, :4].tolist()])
        chunk = cached(model, pool, [other], [4], [ids[0, 4:9].tolist()])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk, full[:, 4:9], atol=1e-5, rtol=1e-5)
    table.release()
    other.release()
    assert pool.used_blocks == 0


def test_rows_at_their_own_positions_match_each_prompt_alone():
    """Ragged prompts read right-padded, then decoded together at per-row positions; a forked table continues its
    parent while sharing its full blocks."""
    from aquila.inference.kv_cache import BlockPool, BlockTable

    model = build_model(tiny_args(), seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (7, 3, 5)]
    continuation = torch.randint(1, 300, (3, 4), generator=gen).tolist()
    pool = BlockPool.for_model(model, 64, block_size=4)
    tables = [BlockTable(pool) for _ in prompts]
    lengths = [len(p) for p in prompts]
    with torch.no_grad():
        got = [cached(model, pool, tables, [0, 0, 0], prompts)]
        for t in range(4):
            got.append(cached(model, pool, tables, [n + t for n in lengths], [[c[t]] for c in continuation]))
        fork = tables[0].fork(lengths[0] + 4)  # continues row 0: its full blocks shared, its last one copied
        assert fork.blocks[:2] == tables[0].blocks[:2] and fork.blocks[2] != tables[0].blocks[2]
        moved = cached(model, pool, [fork], [lengths[0] + 4], [continuation[0][:1]])[0, 0]
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt + continuation[row]]))["logits"][0]
            n = len(prompt)
            torch.testing.assert_close(got[0][row, :n], alone[:n], atol=1e-5, rtol=1e-5)
            for t in range(4):
                torch.testing.assert_close(got[t + 1][row, 0], alone[n + t], atol=1e-5, rtol=1e-5)
        again = model(torch.tensor([prompts[0] + continuation[0] + continuation[0][:1]]))["logits"][0, -1]
    torch.testing.assert_close(moved, again, atol=1e-5, rtol=1e-5)
    for t in (*tables, fork):
        t.release()
    assert pool.used_blocks == 0


def test_positions_beyond_the_tables_or_the_model_are_errors():
    from aquila.inference.kv_cache import BlockPool
    from aquila.model import CachedRows

    model = build_model(tiny_args(max_seq_len=8), seed=0).eval()
    pool = BlockPool.for_model(model, 8, block_size=4)
    ids = torch.ones(1, 1, dtype=torch.long)
    one_block = torch.tensor([[1]])
    with pytest.raises(ValueError, match="block tables"):
        model.cached_forward([CachedRows(ids, torch.tensor([[5]]), torch.tensor([[0]]), one_block, 6)], pool, [0])
    with pytest.raises(ValueError, match="max_seq_len"):
        two = torch.tensor([[1, 2, 1]])
        model.cached_forward([CachedRows(ids, torch.tensor([[9]]), torch.tensor([[0]]), two, 10)], pool, [0])


def test_loss_equals_cross_entropy_and_ignores_minus_100():
    model = build_model(tiny_args(), seed=0)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels, return_logits=True)
    ref = F.cross_entropy(out["logits"][:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=-100)
    # The fused loss recomputes the logits in chunks and sums its own exps: each row's log-sum-exp over V = 300
    # terms may round differently (eps * sqrt(V) absolute), and the mean over n = 16 rows adds eps * sqrt(n) * loss.
    eps, n = torch.finfo(torch.float32).eps, int((labels[:, 1:] != -100).sum())
    bound = 2 * eps * (300**0.5 + n**0.5 * ref.item())  # ~1e-5 here; a wrong mask or shift is off by ~0.1
    torch.testing.assert_close(out["loss"], ref, atol=bound, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_cross_entropy_gradients_match_autograd(reduction, monkeypatch):
    import aquila.loss

    monkeypatch.setattr(aquila.loss, "_CHUNK_ELEMENTS", 7 * 50)  # force several chunks
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    y = torch.randint(0, 50, (23,), generator=gen)
    y[[0, 5, 9]] = -100
    loss = fused_linear_cross_entropy(h, w, y, reduction)
    (loss * 3).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.t(), y, ignore_index=-100, reduction=reduction)
    (ref * 3).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_bad_model_config_values():
    with pytest.raises(AquilaError, match="n_heads"):
        ModelArgs(dim=64, n_heads=5)
    with pytest.raises(AquilaError, match="unknown model name"):
        ModelArgs.from_name("aquila-8b")


def test_rotary_eager_complex_path_matches_real_arithmetic(monkeypatch):
    from aquila.model.aquila_model import apply_rotary, rotary_tables

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=gen, requires_grad=True)
    cos, sin = rotary_tables(torch.arange(5).expand(2, 5) + 3, 8, 10000.0)
    grad = torch.randn(2, 5, 3, 8, generator=gen)
    eager = apply_rotary(x, cos, sin)
    (eager_grad,) = torch.autograd.grad(eager, x, grad)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the route torch.compile traces
    real = apply_rotary(x, cos, sin)
    (real_grad,) = torch.autograd.grad(real, x, grad)
    torch.testing.assert_close(eager, real, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(eager_grad, real_grad, atol=1e-6, rtol=1e-6)
    # A rotation: norms of each pair are kept, and position 0 is the identity.
    torch.testing.assert_close(eager.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))
    cos0, sin0 = rotary_tables(torch.zeros(2, 5, dtype=torch.long), 8, 10000.0)
    torch.testing.assert_close(apply_rotary(x, cos0, sin0), x)


def test_a_row_in_consecutive_blocks_reads_them_as_a_view_with_the_gathers_logits():
    """A lone row whose blocks follow each other is read as a slice of the cache (no gather per layer); the same
    tokens in scattered blocks, read through the gather, give the same logits as a plain forward."""
    from aquila.inference.kv_cache import BlockPool
    from aquila.model import CachedRows
    from aquila.model.aquila_model import _consecutive_blocks

    model = build_model(tiny_args(), seed=0).eval()
    pool = BlockPool.for_model(model, 64, block_size=4)  # 64 positions: blocks 0..15
    ids = torch.randint(1, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(10)[None]
    with torch.no_grad():
        full = model(ids)["logits"][0]
        for blocks, first in (([2, 3, 4, 9], 2), ([7, 1, 5, 3], None)):  # a table may hold more blocks than used
            tables = torch.tensor([blocks])
            assert _consecutive_blocks(tables, 1, 10, pool.block_size) == first
            slots = tables[0, positions // 4] * 4 + positions % 4
            got = model.cached_forward([CachedRows(ids, positions, slots, tables, 10)], pool, list(range(10)))
            torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert _consecutive_blocks(torch.tensor([[2, 3], [4, 5]]), 2, 8, 4) is None  # several rows: the gather
