"""The model-directory route (aquila.checkpoint) and what is applied from outside it: int8, LoRA merge, convert."""

import io
import os
import stat
import subprocess
import sys

import pytest
import torch

import aquila
from aquila.checkpoint import build_model, save_model_dir
from aquila.cli import main as cli_main
from aquila.errors import AquilaError
from aquila.inference.quantize import Int8Linear
from aquila.lora import adapter_state, apply_lora, lora_config, write_adapter
from aquila.train.lora import main as lora_main
from tests.test_inference import ARGS, BOS, DEMO_TOKENIZER, single_thread

IDS = torch.tensor([[BOS, 10, 11, 12]])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture
def base(tmp_path):
    save_model_dir(
        build_model(ARGS, seed=0), tmp_path / "base", formats=("safetensors",), tokenizer_from=DEMO_TOKENIZER
    )
    return tmp_path / "base"


def make_adapter(base, path):
    config = lora_config(r=4, alpha=8, dropout=0.0, targets=["wq", "wv"])
    model = aquila.AutoLoader(model_dir=base.parent, model_name=base.name).get_model()
    apply_lora(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    path.mkdir()
    write_adapter(adapter_state(model.state_dict()), config, path)
    return path


def logits(model_dir, **kwargs):
    loader = aquila.AutoLoader(model_dir=model_dir.parent, model_name=model_dir.name, **kwargs)
    with torch.no_grad():
        return loader.get_model()(IDS)["logits"]


def test_merged_lora_is_a_self_contained_model_dir(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter")
    assert lora_main([str(base), str(adapter), str(tmp_path / "merged")]) == 0
    loader = aquila.AutoLoader(model_dir=tmp_path, model_name="merged")
    assert loader.get_tokenizer().encode("hello") == aquila.Tokenizer.from_pretrained(DEMO_TOKENIZER).encode("hello")
    torch.testing.assert_close(logits(tmp_path / "merged"), logits(base, adapter_dir=adapter), atol=1e-5, rtol=1e-5)
    assert lora_main([str(base), str(adapter), str(tmp_path / "merged")]) == 2  # no silent overwrite


def test_autoloader_on_an_adapter_dir_suggests_adapter_dir(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter")
    with pytest.raises(AquilaError, match="LoRA adapter directory.*adapter_dir="):
        aquila.AutoLoader(model_dir=tmp_path, model_name="adapter")
    (adapter / "config.json").write_bytes((base / "config.json").read_bytes())  # a LoRA training checkpoint
    with pytest.raises(AquilaError, match="no weights found.*LoRA adapter directory.*adapter_dir="):
        aquila.AutoLoader(model_dir=tmp_path, model_name="adapter")


def test_convert_refuses_a_non_empty_destination_unless_overwrite(base, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stray.txt").write_text("old")
    assert cli_main(["convert", str(base), str(dst), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in dst.iterdir()) == ["stray.txt"]
    assert cli_main(["convert", str(base), str(dst), "--to", "hf", "--overwrite"]) == 0
    assert "stray.txt" not in {p.name for p in dst.iterdir()} and (dst / "tokenizer.json").is_file()
    assert cli_main(["quantize", str(base), str(dst)]) == 2


def test_every_written_file_is_0644(base, tmp_path):
    old = os.umask(0o022)
    try:
        save_model_dir(build_model(ARGS, seed=1), tmp_path / "saved", tokenizer_from=DEMO_TOKENIZER)
        assert cli_main(["convert", str(base), str(tmp_path / "hf"), "--to", "hf"]) == 0
        assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "flagai"), "--to", "flagai"]) == 0
        assert cli_main(["quantize", str(base), str(tmp_path / "int8")]) == 0
        assert lora_main([str(base), str(make_adapter(base, tmp_path / "adapter")), str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    for name in ("saved", "hf", "flagai", "int8", "merged", "adapter"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o755, name
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / name).iterdir()}
        assert any(n.endswith("model.safetensors") for n in modes) and set(modes.values()) == {"0o644"}, (name, modes)


def test_config_json_is_read_once_per_load(base, tmp_path, monkeypatch):
    import aquila.checkpoint as checkpoint

    save_model_dir(build_model(ARGS, seed=0), tmp_path / "hf", fmt="hf")
    reads = []
    real = checkpoint.read_json
    monkeypatch.setattr(checkpoint, "read_json", lambda path: reads.append(path) or real(path))
    for name in ("base", "hf"):
        aquila.AutoLoader(model_dir=tmp_path, model_name=name)
    assert [p.name for p in reads] == ["config.json", "config.json"]


def test_int8_weights_are_aligned_at_load_and_forward_keeps_them(base, tmp_path):
    assert cli_main(["quantize", str(base), str(tmp_path / "int8")]) == 0
    model = aquila.AutoLoader(model_dir=tmp_path, model_name="int8").get_model()
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    before = [m.weight.data_ptr() for m in linears]
    assert linears and all(ptr % 64 == 0 for ptr in before)
    with torch.no_grad():
        model(IDS)
    assert [m.weight.data_ptr() for m in linears] == before


def test_no_import_cycle_and_inference_does_not_import_train():
    code = (
        "import sys, aquila.inference.quantize as q; assert 'aquila.inference.loader' not in sys.modules;"
        "import aquila.inference.loader, aquila.convert, aquila.info;"
        "bad = sorted(m for m in sys.modules if m.startswith('aquila.train')); assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    code = "import sys; from aquila.info import main; main(['aquila-7b']); assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # `aquila info PRESET` stays instant


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal(base, tmp_path, monkeypatch, capsys):
    assert cli_main(["quantize", str(base), str(tmp_path / "a")]) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli_main(["quantize", str(base), str(tmp_path / "b")]) == 0
    assert cli_main(["convert", str(base), str(tmp_path / "c"), "--to", "hf"]) == 0
    bars = terminal.getvalue()
    assert "quantizing: 100%" in bars and f"writing {tmp_path / 'c'}: 100%" in bars


def test_read_state_is_under_flagai_names_for_every_format(base, tmp_path):
    from aquila.checkpoint import ModelDir

    expected = ModelDir.open(base).read_state()
    assert cli_main(["convert", str(base), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = ModelDir.open(tmp_path / "hf")
    for state in (hf.read_state(), hf.read_state(tmp_path / "hf" / "model.safetensors")):
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def test_streamed_state_is_read_state_in_its_order_for_every_format(base, tmp_path):
    """iter_state (one tensor at a time) and state_shapes (headers only) give read_state's names, order, shapes,
    dtypes and values: ours, HF (q/k rows permuted back per tensor) and FlagAI's pytorch_model.bin."""
    from aquila.checkpoint import ModelDir

    assert cli_main(["convert", str(base), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert cli_main(["convert", str(base), str(tmp_path / "flagai"), "--to", "flagai"]) == 0
    (tmp_path / "flagai" / "model.safetensors").unlink()
    for path in (base, tmp_path / "hf", tmp_path / "flagai"):
        md = ModelDir.open(path)
        expected = md.read_state()
        streamed = list(md.iter_state())
        assert [k for k, _ in streamed] == list(expected) == list(md.state_shapes()), path.name
        assert all(torch.equal(t, expected[k]) for k, t in streamed), path.name
        shapes = md.state_shapes()
        assert all(
            v.is_meta and v.shape == expected[k].shape and v.dtype == expected[k].dtype for k, v in shapes.items()
        )


def test_int8_dir_is_refused_where_full_precision_is_needed(base, tmp_path, capsys):
    from aquila.checkpoint import load_model_dir

    assert cli_main(["quantize", str(base), str(tmp_path / "int8")]) == 0
    assert cli_main(["convert", str(tmp_path / "int8"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "int8 directory cannot be converted" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    with pytest.raises(AquilaError, match="int8 directory; load it with AutoLoader"):
        load_model_dir(tmp_path / "int8")
