"""`aquila convert --to gguf`: the file read back with gguf's own reader (metadata, tokenizer, tensors in llama.cpp's
layout and types). llama.cpp itself runs these files in tests/test_gguf_llama_cpp.py."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from aquila.chat_template import JINJA_CHAT_TEMPLATE
from aquila.checkpoint import build_model, save_model_dir
from aquila.cli import main
from aquila.config import ModelArgs
from aquila.tokenizer import load_tokenizer
from tests.test_inference import DEMO_TOKENIZER

gguf = pytest.importorskip("gguf", reason="the gguf package (extra 'gguf') is not installed")

# Rows of 64 and 192 (multiple_of=32): every matrix splits into blocks of 32, so every one is quantized.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=16008, multiple_of=32, max_seq_len=96)
GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.1.attention.wq.weight": "blk.1.attn_q.weight",
    "layers.1.attention.wk.weight": "blk.1.attn_k.weight",
    "layers.1.attention.wv.weight": "blk.1.attn_v.weight",
    "layers.1.attention.wo.weight": "blk.1.attn_output.weight",
    "layers.1.feed_forward.w1.weight": "blk.1.ffn_gate.weight",
    "layers.1.feed_forward.w2.weight": "blk.1.ffn_down.weight",
    "layers.1.feed_forward.w3.weight": "blk.1.ffn_up.weight",
    "layers.1.attention_norm.weight": "blk.1.attn_norm.weight",
    "layers.1.ffn_norm.weight": "blk.1.ffn_norm.weight",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "src"
    save_model_dir(build_model(ARGS, seed=7), path, formats=("safetensors",), tokenizer_from=DEMO_TOKENIZER)
    return path


def export(source, dst, outtype="f32"):
    assert main(["convert", str(source), str(dst), "--to", "gguf", "--outtype", outtype]) == 0
    return gguf.GGUFReader(dst)


def field(reader, key):
    return reader.fields[key].contents()


def test_f32_file_holds_the_weights_in_flagai_layout_and_the_tokenizer(source, tmp_path):
    reader = export(source, tmp_path / "m.gguf")
    assert field(reader, "general.architecture") == "llama"
    hparams = {
        "llama.embedding_length": ARGS.dim,
        "llama.block_count": ARGS.n_layers,
        "llama.feed_forward_length": ARGS.ffn_dim,
        "llama.attention.head_count": ARGS.n_heads,
        "llama.attention.head_count_kv": ARGS.kv_heads,
        "llama.context_length": ARGS.max_seq_len,
        "llama.rope.dimension_count": ARGS.head_dim,
        "llama.vocab_size": ARGS.vocab_size,
    }
    assert {k: field(reader, k) for k in hparams} == hparams
    assert field(reader, "llama.rope.freq_base") == ARGS.rope_theta
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32

    state = build_model(ARGS, seed=7).state_dict()
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(state)
    for ours, theirs in GGUF_NAMES.items():
        t = tensors[theirs]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        # q/k rows exactly as aquila holds them: llama.cpp's llama rotary pairs (2j, 2j+1), as FlagAI does
        assert np.array_equal(np.asarray(t.data).reshape(state[ours].shape), state[ours].numpy()), theirs


def test_tokenizer_metadata_is_ours(source, tmp_path):
    reader = export(source, tmp_path / "m.gguf")
    tok = load_tokenizer(DEMO_TOKENIZER)
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert tokens == [tok.id_to_token(i) for i in range(len(tok))]
    control = {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert control == set(tok.special_ids.values())  # the 8 appended specials and <|endoftext|>
    assert field(reader, "tokenizer.ggml.merges") == [f"{a} {b}" for a, b in tok.merges]
    ids = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")]
    assert ids == [ARGS.vocab_size - 2, ARGS.vocab_size - 1, 0, 0]  # [CLS], </s>, <|endoftext|>
    assert (field(reader, "tokenizer.ggml.add_bos_token"), field(reader, "tokenizer.ggml.add_eos_token")) == (
        True,
        False,
    )
    assert field(reader, "tokenizer.chat_template") == JINJA_CHAT_TEMPLATE


def _row_blocks(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "outtype, qtype, levels",
    # A value's error is at most half a step (q8_0: step = max|block| / 127) or, for q4_0 (step = max / -8, levels
    # -8..7), a whole step at the far end; the step itself is rounded to fp16 (relative 2^-11 per level).
    [("q8_0", "Q8_0", 127 / (0.5 + 127 * 2**-11)), ("q4_0", "Q4_0", 8 / (1 + 8 * 2**-11))],
)
def test_quantized_matrices_are_within_one_step_and_norms_stay_f32(source, tmp_path, outtype, qtype, levels):
    reader = export(source, tmp_path / "m.gguf", outtype)
    state = build_model(ARGS, seed=7).state_dict()
    tensors = {t.name: t for t in reader.tensors}
    for ours, theirs in GGUF_NAMES.items():
        t, w = tensors[theirs], state[ours].numpy()
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(t.data, w)
            continue
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, qtype), theirs
        deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        bound = np.abs(_row_blocks(w)).max(axis=1, keepdims=True) / levels * (1 + 1e-6)
        assert np.all(np.abs(_row_blocks(deq) - _row_blocks(w)) <= bound), theirs


@pytest.mark.slow
def test_f16_and_fallback_for_rows_that_do_not_split_into_blocks(tmp_path, capsys):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=16008, multiple_of=16, max_seq_len=32)
    assert args.ffn_dim % 32 != 0  # ffn_down's rows (176) are not whole q8_0 blocks
    save_model_dir(build_model(args, seed=1), tmp_path / "src", formats=("bin",), tokenizer_from=DEMO_TOKENIZER)
    reader = export(tmp_path / "src", tmp_path / "q.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    assert "blk.0.ffn_down.weight" in capsys.readouterr().err
    reader = export(tmp_path / "src", tmp_path / "h.gguf", "f16")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.slow
def test_model_vocabulary_larger_than_the_tokenizer_is_padded_with_unused_tokens(tmp_path):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=16032, multiple_of=32, max_seq_len=32)
    save_model_dir(build_model(args, seed=1), tmp_path / "src", formats=("bin",), tokenizer_from=DEMO_TOKENIZER)
    reader = export(tmp_path / "src", tmp_path / "m.gguf")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == 16032 and tokens[16008:] == [f"[PAD{i}]" for i in range(16008, 16032)]
    assert set(types[16008:]) == {gguf.TokenType.UNUSED}


def test_gguf_errors_are_one_line(source, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    assert main(["convert", str(source), str(tmp_path / "dir"), "--to", "gguf"]) == 2
    assert "is a directory; --to gguf writes one file" in capsys.readouterr().err
    shutil.copytree(source, tmp_path / "no_tok")
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "no_tok" / name).unlink(missing_ok=True)
    assert main(["convert", str(tmp_path / "no_tok"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no tokenizer files" in err
    assert not (tmp_path / "m.gguf").exists()
    (tmp_path / "m.gguf").write_bytes(b"old")
    assert main(["convert", str(source), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "m.gguf").read_bytes() == b"old"


@pytest.mark.slow
def test_f32_export_reads_back_from_hf_and_flagai_sources(source, tmp_path):
    """FlagAI's files (pytorch_model.bin, vocab.json, merges.txt), ours and HF directories give the same GGUF tensors
    and tokens (the HF q/k permutation is undone on the way in)."""
    assert main(["convert", str(source), str(tmp_path / "hf"), "--to", "hf"]) == 0
    flagai = tmp_path / "flagai"
    assert main(["convert", str(source), str(flagai), "--to", "flagai"]) == 0
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (flagai / name).unlink(missing_ok=True)
    a = export(source, tmp_path / "a.gguf")
    for other in (tmp_path / "hf", flagai):
        b = export(other, tmp_path / f"{other.name}.gguf")
        assert field(a, "tokenizer.ggml.tokens") == field(b, "tokenizer.ggml.tokens")
        assert field(a, "tokenizer.ggml.merges") == field(b, "tokenizer.ggml.merges")
        assert sorted(t.name for t in a.tensors) == sorted(t.name for t in b.tensors)
        theirs = {t.name: t for t in b.tensors}
        for t in a.tensors:
            assert np.array_equal(t.data, theirs[t.name].data), (other.name, t.name)


# Peak RSS growth of one `aquila convert --to gguf` in a fresh process, measured after the imports and the tokenizer.
CONVERT_RSS = """
import resource, sys
from aquila.cli import main
from aquila.gguf_export import require
from aquila.tokenizer import load_tokenizer
require("gguf", "test"); load_tokenizer(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert main(["convert", sys.argv[1], sys.argv[2], "--to", "gguf"]) == 0
print("GROWTH", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def convert_rss_growth(src, dst) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CONVERT_RSS, str(src), str(dst)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(next(ln for ln in out.stdout.splitlines() if ln.startswith("GROWTH")).split()[1])


@pytest.mark.slow
def test_export_streams_so_peak_memory_does_not_grow_with_the_model(tmp_path):
    """The export holds one tensor at a time (a 29 GB fp32 7B model did not fit in 23 GB when it read the whole
    state dict): from 2 to 16 layers (~90 to ~270 MB of fp32), the peak RSS grows by under 0.3x the added bytes
    (reading the whole state grew it by ~1.0x; the constant, ~120 MB, is the tokenizer and the metadata)."""
    growth, size = [], []
    for layers in (2, 16):
        args = ModelArgs(dim=512, n_layers=layers, n_heads=8, vocab_size=16008, multiple_of=32, max_seq_len=96)
        src = tmp_path / f"src{layers}"
        save_model_dir(build_model(args, seed=1), src, formats=("safetensors",), tokenizer_from=DEMO_TOKENIZER)
        size.append((src / "model.safetensors").stat().st_size)
        growth.append(convert_rss_growth(src, tmp_path / f"m{layers}.gguf"))
    added = size[1] - size[0]
    assert growth[1] - growth[0] < 0.3 * added, (growth, size)
