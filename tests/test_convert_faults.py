"""Faults of `aquila convert` / `aquila quantize` that used to destroy or half-write model directories: DST that is
SRC (or inside it, or around it) and a tokenizer file set that does not load."""

import pytest

from aquila.checkpoint import build_model, save_model_dir
from aquila.cli import main
from tests.test_inference import ARGS, DEMO_TOKENIZER

VERBS = {
    "convert-hf": ["convert", "{src}", "{dst}", "--to", "hf", "--overwrite"],
    "convert-flagai": ["convert", "{src}", "{dst}", "--to", "flagai", "--overwrite"],
    "convert-gguf": ["convert", "{src}", "{dst}", "--to", "gguf", "--overwrite"],
    "quantize": ["quantize", "{src}", "{dst}", "--overwrite"],
}


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "models" / "src"
    save_model_dir(build_model(ARGS, seed=2), path, formats=("safetensors",), tokenizer_from=DEMO_TOKENIZER)
    return path


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize(
    "where, message",
    [("same", "is the source directory"), ("inside", "is inside the source"), ("around", "contains the source")],
)
def test_destination_overlapping_the_source_is_refused_and_the_source_kept(source, verb, where, message, capsys):
    dst = {"same": source, "inside": source / "out", "around": source.parent}[where]
    before = snapshot(source.parent)
    argv = [a.format(src=source, dst=dst) for a in VERBS[verb]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert snapshot(source.parent) == before


def test_relative_spelling_of_the_source_is_recognised(source, monkeypatch, capsys):
    monkeypatch.chdir(source.parent)
    assert main(["quantize", "src", "./src/../src", "--overwrite"]) == 2
    assert "is the source directory" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["quantize", "convert-hf"])
@pytest.mark.parametrize(
    "missing, message", [("vocab.json", "has no vocab.json beside it"), ("merges.txt", "no merges.txt")]
)
def test_half_a_bpe_tokenizer_is_refused_before_anything_is_written(source, tmp_path, verb, missing, message, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json", missing):
        (source / name).unlink()
    dst = tmp_path / "out"
    assert main([a.format(src=source, dst=dst) for a in VERBS[verb]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not dst.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:4], "not a valid safetensors file"),  # shorter than its header length
        (lambda b: b[:8] + b"x" + b[9:], "not a valid safetensors file"),  # header is not JSON
        (lambda b: b[: len(b) - 100], "the file ends inside its data"),  # truncated data
    ],
)
def test_damaged_safetensors_is_one_error_line_and_no_gguf(source, tmp_path, damage, message, capsys):
    """The streamed GGUF export reads the safetensors file itself (header, then each tensor)."""
    weights = source / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    dst = tmp_path / "m.gguf"
    assert main(["convert", str(source), str(dst), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not dst.exists() and not list(tmp_path.glob(".m.gguf*"))
