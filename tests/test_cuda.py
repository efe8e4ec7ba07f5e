"""The suite's CUDA checks (marker `cuda`): run on a GPU by bench/gpu_check.sh (`pytest -m cuda tests/test_cuda.py`).

Without a CUDA device every test here is skipped with the reason "no CUDA device" (shown by `pytest -rs`).
Measured errors go into the junit XML as properties, so the GPU check's table shows them next to the tolerance.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from aquila.checkpoint import build_model
from aquila.config import ModelArgs
from aquila.inference.generate import DecodeBatch, Request, decode_step, prefill, run
from aquila.inference.kv_cache import BlockPool, BlockTable
from aquila.inference.quantize import Int8Embedding, Int8Linear

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

TINY = ModelArgs.from_name("aquila-tiny")
# bf16 keeps 8 mantissa bits (relative rounding 2^-9): after the tiny model's 4 blocks the RMS difference of the
# logits from fp32 stays under 2% of their RMS.
BF16_REL_TOL = 0.02
FP32_REL_TOL = 1e-4


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


def tiny_model(device: torch.device, dtype: torch.dtype = torch.float32):
    """Seeded on the CPU (CUDA's generator draws other numbers), then moved: the same weights on both devices."""
    return build_model(TINY, "cpu", torch.float32, seed=0).to(device, dtype).eval()


def random_ids(shape: tuple[int, ...], device: torch.device, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of the difference over the reference's RMS."""
    a, ref = a.float(), ref.float()
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


@torch.no_grad()
def test_bf16_logits_match_fp32(device, record_property):
    ids = random_ids((2, 128), device)
    ref = tiny_model(device)(ids)["logits"]
    err = rel_err(tiny_model(device, torch.bfloat16)(ids)["logits"], ref)
    cpu = tiny_model(torch.device("cpu"))(ids.cpu())["logits"]
    cpu_err = rel_err(ref.cpu(), cpu)
    record_property("bf16 rel err", f"{err:.2e} (tol {BF16_REL_TOL})")
    record_property("fp32 vs CPU rel err", f"{cpu_err:.1e} (tol {FP32_REL_TOL})")
    assert err < BF16_REL_TOL
    assert cpu_err < FP32_REL_TOL  # same weights, fp32 matmuls without TF32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_kv_cache_decode_equals_full_forward(device, dtype, record_property):
    model = tiny_model(device, dtype)
    ids = random_ids((2, 40), device, seed=1)
    full = model(ids)["logits"]  # [2, 40, V]
    pool, tables = tables_for(model, 2, 64)
    steps = [prefill(model, pool, tables, ids[:, :24].tolist(), [0, 0])]
    table_ids = torch.tensor([t.blocks for t in tables], device=device)
    for p in range(24, 40):
        pos = torch.full((2, 1), p, device=device)
        steps.append(decode_step(model, pool, table_ids, ids[:, p : p + 1], pos, p + 1))
    cached = torch.stack(steps, dim=1)  # logits after positions 23..39
    err = rel_err(cached, full[:, 23:])
    record_property(f"{dtype} rel err", f"{err:.1e}")
    assert err < (FP32_REL_TOL if dtype == torch.float32 else BF16_REL_TOL)
    if dtype == torch.float32:
        assert torch.equal(cached.argmax(-1), full[:, 23:].argmax(-1))


def tables_for(model, rows: int, positions: int) -> tuple[BlockPool, list[BlockTable]]:
    pool = BlockPool.for_model(model, rows * positions)
    tables = [BlockTable(pool) for _ in range(rows)]
    for t in tables:
        assert t.reserve(positions)
    return pool, tables


@torch.no_grad()
def test_ragged_prompt_batch_matches_each_row_alone(device, record_property):
    """A right-padded prompt batch (padding writes the pool's scratch block) gives each row's own next logits."""
    model = tiny_model(device)
    lengths = [5, 12, 20]
    prompts = [random_ids((n,), device, seed=n) for n in lengths]
    pool, tables = tables_for(model, len(lengths), 64)
    batched = prefill(model, pool, tables, [p.tolist() for p in prompts], [0] * len(lengths))
    alone = torch.stack([model(p[None])["logits"][0, -1] for p in prompts])
    err = rel_err(batched, alone)
    record_property("rel err", f"{err:.1e}")
    assert err < FP32_REL_TOL


@torch.no_grad()
def test_ragged_batch_greedy_matches_single_requests(device):
    model = tiny_model(device)
    requests = [Request(tuple(random_ids((n,), device, seed=n).tolist()), 12) for n in (3, 9, 17)]
    together = run(DecodeBatch(model, len(requests), 64), requests)
    alone = [run(DecodeBatch(model, 1, 64), [r])[0] for r in requests]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


@torch.no_grad()
def test_compiled_decode_step_matches_eager(device):
    """decode_step under torch.compile(mode="reduce-overhead") (CUDA graphs) at a fixed kv_len gives eager's tokens."""
    model = tiny_model(device)
    step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    prompt = random_ids((2, 8), device, seed=3).tolist()
    tokens = {}
    for name, fn in (("eager", decode_step), ("compiled", step)):
        pool, tables = tables_for(model, 2, 64)
        table_ids = torch.tensor([t.blocks for t in tables], device=device)
        tok = prefill(model, pool, tables, prompt, [0, 0]).argmax(-1)[:, None]
        pos, out = torch.full((2, 1), 8, device=device), []
        for _ in range(10):
            torch.compiler.cudagraph_mark_step_begin()
            tok = fn(model, pool, table_ids, tok, pos, 64).argmax(-1)[:, None]
            out.append(tok.clone())
            pos += 1
        tokens[name] = torch.cat(out, 1).tolist()
    assert tokens["compiled"] == tokens["eager"]


def test_fp16_loss_scaler_skips_overflow_steps(device, tmp_path):
    """`aquila pretrain` in fp16 from a loss scale of 2^32: the first steps overflow, are skipped and halve the
    scale; once it is small enough the steps count and the loss is finite."""
    from aquila.train.pretrain import main
    from tests.train_helpers import make_indexed_dataset

    prefix = make_indexed_dataset(tmp_path / "synth", vocab=512)
    flags = ["--model_name", "aquila-micro", "--data_prefix", prefix, "--seq_length", "32", "--batch_size", "4"]
    flags += ["--max_steps", "30", "--log_interval", "1", "--save_interval", "1000", "--lr", "1e-3"]
    flags += ["--fp16", "True", "--bmt_loss_scale", str(2.0**32), "--bmt_loss_scale_steps", "1000"]
    flags += ["--save_dir", str(tmp_path / "out"), "--peak_tflops", "1", "--pytorch_device", "cuda"]
    assert main(flags) == 0
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["kind"] == "train"]
    assert recs[0]["nan_skipped"] == 1, recs[0]
    scale = 2.0**32
    for r in recs:  # one record per iteration: an overflow halves the scale, a counted step keeps it
        if r["nan_skipped"]:
            assert r["loss_scale"] == scale / 2, r
        else:
            assert r["loss_scale"] == scale and math.isfinite(r["loss"]), r
        scale = r["loss_scale"]
    assert sum(not r["nan_skipped"] for r in recs) >= 10, [r["loss_scale"] for r in recs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_int8_matmul_matches_dequantized_fp32(device, dtype, record_property):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(768, 512, generator=gen) * 0.02).to(device)
    x = torch.randn(4, 7, 512, generator=gen).to(device, dtype)
    lin = Int8Linear.from_weight(w)
    dequant = lin.weight.float() * lin.scales[:, None]
    ref = F.linear(x.float(), dequant)
    out = lin(x)
    err = rel_err(out, ref)
    record_property(f"{dtype} rel err", f"{err:.1e}")
    assert out.dtype == dtype and out.device.type == "cuda"
    assert err < (FP32_REL_TOL if dtype == torch.float32 else BF16_REL_TOL)
    emb = Int8Embedding.from_weight(w)
    ids = torch.tensor([[0, 5, 767]], device=device)
    torch.testing.assert_close(emb(ids), F.embedding(ids, dequant))


@torch.no_grad()
def test_sdpa_fused_backend_for_bf16_attention(device, record_property):
    """Without the MATH fallback, the attention dispatch still runs (training: causal; decode: a bool mask) and
    agrees with MATH; the table of bench/gpu_check.py names the backend that ran by default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from aquila.attention import attention

    gen = torch.Generator(device=device).manual_seed(0)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool, device=device)
    mask[..., 40:] = False
    cases = {
        "causal": ((2, 8, 128, 64), (2, 8, 128, 64), None, True),
        "masked": ((2, 8, 1, 64), (2, 8, 64, 64), mask, False),
    }
    for name, (qs, kvs, m, causal) in cases.items():
        q, k, v = (torch.randn(s, device=device, dtype=torch.bfloat16, generator=gen) for s in (qs, kvs, kvs))
        with sdpa_kernel([SDPBackend.MATH]):
            ref = attention(q, k, v, m, causal)
        with sdpa_kernel(fused):
            out = attention(q, k, v, m, causal)
        err = rel_err(out, ref)
        record_property(f"{name} rel err", f"{err:.1e}")
        assert err < BF16_REL_TOL
