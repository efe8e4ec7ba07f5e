"""Packed linear layers (our AVX-512 kernel where it builds, else oneDNN): same results as nn.Linear, rows
independent of their batch, CLI default."""

import argparse

import pytest
import torch
from torch import nn

from aquila.checkpoint import build_model
from aquila.config import ModelArgs
from aquila.errors import AquilaError
from aquila.inference.generate import DecodeBatch, Request, run
from aquila.inference.options import add_model_args, load_predictor
from aquila.inference.packing import PackedLinear, can_pack, own_packing, pack_linears, packing_available
from aquila.inference.sampling import SamplingParams
from tests.test_inference import single_thread, write_checkpoint

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=1000, multiple_of=16, max_seq_len=96)
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_nn_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear)
    for shape in [(1, 96), (3, 1, 96), (2, 7, 96), (17, 96), (70, 96)]:  # 70 rows: past our kernel's MAX_ROWS
        x = torch.randn(shape)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert "in_features=96, out_features=200" in repr(packed)


def test_a_row_is_the_same_alone_and_in_a_batch():
    torch.manual_seed(1)
    packed = PackedLinear(nn.Linear(128, 3000, bias=False))
    x = torch.randn(16, 128)
    batch = packed(x)
    for i in (0, 5, 15):
        assert torch.equal(packed(x[i : i + 1]), batch[i : i + 1])
    assert torch.equal(packed(x[:4]), batch[:4])


def test_pack_linears_replaces_plain_linears_and_keeps_greedy_tokens():
    plain = build_model(ARGS, seed=0).eval()
    packed = build_model(ARGS, seed=0).eval()
    n_linear = sum(type(m) is nn.Linear for m in plain.modules())
    assert can_pack(packed)
    assert pack_linears(packed) == n_linear == 7 * ARGS.n_layers + 1
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert not can_pack(packed)  # nothing left to pack
    # the packed tensors are not weights of the state dict; the norms and embedding still are
    assert set(packed.state_dict()) == {k for k in plain.state_dict() if not k.endswith(("wq.weight", "wk.weight",
        "wv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight")) and k != "output.weight"}  # fmt: skip
    requests = [Request(tuple(range(5, 5 + n)), 10, GREEDY) for n in (3, 11, 20, 6)]
    want = run(DecodeBatch(plain, 4, 64), requests)
    got = run(DecodeBatch(packed, 4, 64), requests)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_packed_batch_gives_each_request_its_solo_tokens():
    model = build_model(ARGS, seed=3).eval()
    pack_linears(model)
    requests = [
        Request(tuple((7 * i + j) % 990 + 5 for j in range(n)), 8, GREEDY, logprobs=True)
        for i, n in enumerate((2, 9, 4, 15, 1, 12, 6, 3))
    ]
    together = run(DecodeBatch(model, 8, 64, prefill_tokens=16), requests)
    for request, batched in zip(requests, together):
        alone = run(DecodeBatch(model, 1, 64), [request])[0]
        assert batched.token_ids == alone.token_ids
        # the linears are exact per row; attention over a longer masked cache window sums in another order
        torch.testing.assert_close(batched.logprobs, alone.logprobs, rtol=0, atol=1e-5)


def test_packing_refuses_what_it_cannot_compute():
    half = nn.Linear(8, 8).half()
    with pytest.raises(AquilaError, match="float32 CPU weight"):
        PackedLinear(half)
    packed = PackedLinear(nn.Linear(8, 8))
    with pytest.raises(AquilaError, match="compute in float32"):
        packed(torch.randn(2, 8, dtype=torch.bfloat16))
    assert not can_pack(build_model(ARGS, seed=0).half())


def _cli_args(ckpt, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return parser.parse_args(["--model-dir", str(ckpt.parent), "--model-name", ckpt.name, *extra])


def test_cli_loading_packs_for_several_rows_and_no_pack_keeps_linears(tmp_path):
    ckpt = write_checkpoint(tmp_path)
    packed = load_predictor(_cli_args(ckpt), rows=4)
    plain = load_predictor(_cli_args(ckpt, "--no-pack"), rows=4)
    one_row = load_predictor(_cli_args(ckpt))  # a single stream (chat): packed for our kernel only (oneDNN is slower)
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    assert any(isinstance(m, PackedLinear) for m in one_row.model.modules()) == own_packing(64)
    half = load_predictor(_cli_args(ckpt, "--dtype", "float16"), rows=4)  # not fp32: left as it is
    assert not any(isinstance(m, PackedLinear) for m in half.model.modules())
    kwargs = dict(out_max_length=12, temperature=0)
    assert packed.predict_generate_randomsample("The city", **kwargs) == plain.predict_generate_randomsample(
        "The city", **kwargs
    )


def test_own_kernel_packs_where_it_builds_and_onednn_elsewhere():
    linear = nn.Linear(64, 40)
    ours, other = PackedLinear(linear), PackedLinear(nn.Linear(72, 40))  # 72: not whole 64-byte pieces
    assert ours.own_kernel == own_packing(64) and not other.own_kernel
    if ours.own_kernel:
        assert ours.packed.shape == (10, 4, 4, 16)  # 40 rows in blocks of 4, 64 columns in pieces of 16


def test_pack_linears_releases_each_fp32_weight_as_it_goes(monkeypatch):
    """Memory stays at about one copy of the weights: a layer's fp32 weight is gone once it is packed (a list of
    the modules held them all until the end: a 1B model's load peaked at twice its weights)."""
    import gc
    import weakref

    from aquila.inference import packing

    model = build_model(ARGS, seed=0).eval()
    refs = [weakref.ref(m) for m in model.modules() if type(m) is nn.Linear]
    alive, real = [], packing.PackedLinear

    def counting(linear: nn.Linear) -> PackedLinear:
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        return real(linear)

    monkeypatch.setattr(packing, "PackedLinear", counting)
    assert pack_linears(model) == len(refs)
    assert alive == list(range(len(refs), 0, -1))
