"""int4 weight-only quantization: the codes, the CPU kernel against the dequantized weights, save/load through
`aquila quantize --bits 4`, AutoLoader(quantize="int4"), `--int4`, strict loading, greedy stability."""

import json
import shutil

import pytest
import torch

import aquila
from aquila.checkpoint import build_model, save_model_dir
from aquila.cli import main as cli_main
from aquila.config import ModelArgs
from aquila.errors import AquilaError
from aquila.inference import int4
from aquila.inference.int4 import Int4Linear, dequantize_int4, prepare_int4, quantize_weight_int4
from aquila.inference.quantize import Int8Embedding, quantize_model, weight_bytes
from tests.test_inference import DEMO_TOKENIZER, single_thread

TINY = ModelArgs.from_name("aquila-tiny")  # dim 256, ffn 704: every input width a multiple of 64
# bf16 carries 8 significant bits: the kernel's bf16 activations and the bf16 (scale, zero) cost ~2^-8 relative
# each per product, summed in fp32, so a layer's output differs from the fp32 product with the same dequantized
# weights by a few 2^-8 relative (RMS); through 4 layers and the output matrix, 4% bounds it.
KERNEL_RMS = 0.04


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


def rms_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("group", [32, 64])
def test_codes_reconstruct_within_half_a_step(group):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) + 0.3
    packed, scales = quantize_weight_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128) and scales.shape == (48, 256 // group, 2)
    step = scales[..., 0].float().repeat_interleave(group, 1)
    zero = scales[..., 1].float().repeat_interleave(group, 1)
    # half a step from rounding the code, plus the bf16 rounding of the zero point (2^-9 relative)
    bound = step / 2 + zero.abs() * 2**-8 + 1e-6
    assert ((dequantize_int4(packed, scales) - w).abs() <= bound).all()


@pytest.mark.parametrize("rows", [64, 40, 1040])  # 40 and 1040: padded to 16 rows, and over one conversion block
def test_prepared_kernel_matches_the_dequantized_weight(rows):
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(rows, 128, generator=gen), torch.randn(3, 128, generator=gen)
    layer = Int4Linear.from_weight(w, 32)
    with torch.no_grad():
        ref = x @ dequantize_int4(layer.weight, layer.scales).t()
        assert torch.allclose(layer(x), ref, rtol=1e-4, atol=1e-4)  # unprepared: the dequantized weight in fp32
        layer.prepare_for_cpu()
        got = layer(x)
    assert layer.prepared and got.shape == (3, rows)
    assert rms_rel(got, ref) < 2**-6  # bf16 activations and scales (see KERNEL_RMS)


@pytest.mark.parametrize("rows", [16, 48, 64, 112, 1040])  # short blocks of 16/48 rows, full ones, both
def test_load_time_packing_gives_the_kernels_own_bytes(rows):
    codes = torch.randint(0, 16, (rows, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(int4.kernel_packer()(codes), int4._pack_by_kernel(codes))
    if torch.backends.cpu.get_cpu_capability() == "AVX512":  # where the fast packing applies, it is the one used
        assert int4.kernel_packer() is int4._pack_avx512


def test_int4_model_logits_and_bytes():
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = quantize_model(build_model(TINY, seed=0).eval(), bits=4)
        ref = plain(ids)["logits"]
        got = prepare_int4(plain)(ids)["logits"]
        half = plain.half()(ids)["logits"]  # the model card's .half(): the kernel's buffers are left as they are
    assert all(type(m) is not torch.nn.Linear for m in plain.modules())
    assert isinstance(plain.output, Int4Linear) and isinstance(plain.tok_embeddings, Int8Embedding)
    assert rms_rel(got, ref) < KERNEL_RMS
    assert rms_rel(half.float(), ref) < 2 * KERNEL_RMS  # fp16 norms and activations between the kernels
    # 4.5 bits a linear weight (4 + bf16 scale and zero per 64), 8 bits an embedding weight (+ fp32 row scales,
    # norms and the output matrix padded to 16 rows: under 2% here)
    fp32 = build_model(TINY, seed=0)
    linear = sum(m.weight.numel() for m in fp32.modules() if type(m) is torch.nn.Linear)
    assert weight_bytes(plain) < 1.02 * (linear * 4.5 / 8 + fp32.tok_embeddings.weight.numel())


def test_group_size_is_checked():
    with pytest.raises(AquilaError, match="not a multiple of the int4 group size 64"):
        quantize_model(build_model(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16)), bits=4)
    with pytest.raises(AquilaError, match="group size must be one of"):
        quantize_weight_int4(torch.zeros(16, 48), 48)


@pytest.fixture
def fp32_dir(tmp_path):
    save_model_dir(build_model(TINY, seed=0).eval(), tmp_path / "fp32")
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy(f, tmp_path / "fp32")
    return tmp_path / "fp32"


def test_quantize_verb_autoloader_and_strict_load(fp32_dir, tmp_path):
    assert cli_main(["quantize", str(fp32_dir), str(tmp_path / "q4"), "--bits", "4", "--group-size", "32"]) == 0
    qcfg = json.loads((tmp_path / "q4" / "quantization.json").read_text())
    assert qcfg["format"] == "aquila-int4" and qcfg["group_size"] == 32
    ids = torch.tensor([[16006, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = prepare_int4(quantize_model(build_model(TINY, seed=0).eval(), bits=4, group_size=32))(ids)
        from_dir = aquila.AutoLoader(model_dir=tmp_path, model_name="q4").get_model()
        assert torch.equal(from_dir(ids)["logits"], expected["logits"])
        on_load = aquila.AutoLoader(model_dir=tmp_path, model_name="fp32", quantize="int4").get_model()
        assert isinstance(on_load.output, Int4Linear) and on_load.output.group_size == 64 and on_load.output.prepared

    with pytest.raises(AquilaError, match="int4 directory; quantize='int8'"):
        aquila.AutoLoader(model_dir=tmp_path, model_name="q4", quantize="int8")
    with pytest.raises(AquilaError, match="quantize must be None, 'int8' or 'int4'"):
        aquila.AutoLoader(model_dir=tmp_path, model_name="fp32", quantize="int3")
    # strict: a missing tensor is named
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "q4" / "model.safetensors")
    del state["layers.0.attention.wq.scales"]
    save_file(state, tmp_path / "q4" / "model.safetensors")
    with pytest.raises(AquilaError, match="missing keys: layers.0.attention.wq.scales"):
        aquila.AutoLoader(model_dir=tmp_path, model_name="q4")
    assert cli_main(["quantize", str(fp32_dir), str(tmp_path / "bad"), "--bits", "4", "--group-size", "48"]) == 2


def test_greedy_decode_is_stable_and_cli_flag(fp32_dir, tmp_path, capsys):
    from aquila.inference.generate import DecodeBatch, Request, run

    model = aquila.AutoLoader(model_dir=fp32_dir.parent, model_name="fp32", quantize="int4").get_model()
    request = Request((16006, *range(1, 20)), 8)
    first = run(DecodeBatch(model, 1, 40), [request])[0].token_ids
    # a row's tokens do not depend on the rows decoding beside it
    both = run(DecodeBatch(model, 2, 40), [request, Request((16006, 7, 8), 8)])
    assert both[0].token_ids == first and len(first) == 8
    argv = ["generate", "--model-dir", str(fp32_dir.parent), "--model-name", "fp32", "--int4", "--max-new-tokens"]
    assert cli_main([*argv, "4", "--temperature", "0", "--prompt", "hello"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit, match="2"):
        cli_main([*argv, "4", "--int8", "--prompt", "hello"])
    assert "not allowed with argument --int4" in capsys.readouterr().err
