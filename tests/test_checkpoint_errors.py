"""Bad model inputs: each a single clear line and exit status 2 from the CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from aquila.checkpoint import build_model, load_model_dir, save_model_dir
from aquila.cli import main
from aquila.config import ModelArgs
from aquila.errors import AquilaError
from tests.conftest import tiny_args
from tests.test_inference import DEMO_TOKENIZER


@pytest.fixture
def model_dir(tmp_path):
    model = build_model(tiny_args(), seed=0)
    save_model_dir(model, tmp_path / "m")
    return tmp_path / "m"


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "aquila", *args], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_save_and_load_round_trip_both_formats(model_dir):
    model = build_model(tiny_args(), seed=0)
    for weights in ("model.safetensors", "pytorch_model.bin"):
        loaded = load_model_dir(model_dir, weights=model_dir / weights)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert json.loads((model_dir / "config.json").read_text())["dim"] == 64


def test_flagai_module_wrapped_bin_loads(model_dir, tmp_path):
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    torch.save({"module": state, "iteration_in_epoch": 3}, tmp_path / "wrapped.bin")
    loaded = load_model_dir(model_dir, weights=tmp_path / "wrapped.bin")
    assert torch.equal(loaded.output.weight, state["output.weight"])


def test_flagai_runtime_keys_accepted_unknown_key_rejected(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "flash_atten": False, "flash_atten_llama_style": False}))
    assert ModelArgs.load(model_dir / "config.json").dim == 64
    (model_dir / "config.json").write_text(json.dumps({**cfg, "hidden_sizee": 3}))
    with pytest.raises(AquilaError, match="unknown key 'hidden_sizee'"):
        ModelArgs.load(model_dir / "config.json")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda cfg: {**cfg, "n_layers": "2"}, "key 'n_layers': expected an integer"),
        (lambda cfg: {**cfg, "norm_eps": "1e-5"}, "YAML 1.1|dot"),
        (lambda cfg: {**cfg, "bogus": 1}, "unknown key 'bogus'"),
    ],
)
def test_bad_config_values(model_dir, edit, message):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(AquilaError, match=message):
        load_model_dir(model_dir)


def test_missing_layer_is_listed(model_dir):
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    for key in [k for k in state if k.startswith("layers.1.")]:
        del state[key]
    torch.save(state, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(AquilaError, match=r"missing keys: layers\.1\."):
        load_model_dir(model_dir)


def test_wrong_shape_is_listed(model_dir):
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    state["norm.weight"] = torch.ones(65)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(AquilaError, match=r"shape mismatches: norm.weight \(65,\) != \(64,\)"):
        load_model_dir(model_dir)


def test_unexpected_key_is_listed(model_dir):
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    state["layers.9.extra.weight"] = torch.ones(2)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(AquilaError, match=r"unexpected keys: layers\.9\.extra\.weight"):
        load_model_dir(model_dir)


def test_directory_without_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").unlink()
    with pytest.raises(AquilaError, match="no weights found"):
        load_model_dir(model_dir)


def test_truncated_safetensors(model_dir):
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AquilaError, match="not a valid safetensors file"):
        load_model_dir(model_dir)


def test_pickle_with_code_is_refused(model_dir, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(AquilaError, match="cannot read torch checkpoint"):
        load_model_dir(model_dir, weights=tmp_path / "evil.bin")


def test_cli_info_7b_and_errors(model_dir, tmp_path):
    code, out, _ = run_cli("info", "aquila-7b")
    assert code == 0 and "7,295,537,152" in out
    code, out, _ = run_cli("info", str(model_dir))
    assert code == 0 and "FlagAI directory" in out
    (model_dir / "config.json").write_text("{not json")
    code, _, err = run_cli("convert", str(model_dir), str(tmp_path / "out"), "--to", "hf")
    assert code == 2
    assert err.startswith("error: ") and "config.json" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_convert_round_trip(model_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):  # tokenizer files travel with the weights
        shutil.copy(DEMO_TOKENIZER / name, model_dir)
    assert main(["convert", str(model_dir), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == (DEMO_TOKENIZER / "vocab.json").read_bytes()

    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "flagai"]) == 0
    a, b = load_model_dir(model_dir), load_model_dir(tmp_path / "back")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
