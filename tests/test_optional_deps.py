"""A missing optional dependency is one `error:` line naming the extra to install (exit 2), never a traceback.

Each test hides one module the way a machine without it would see it: `sys.modules[name] = None` makes every
`import name` raise ModuleNotFoundError.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from aquila.errors import AquilaError, run_command
from aquila.optional import EXTRAS, require
from tests.train_helpers import pretrain_config, write_yaml

ROOT = Path(__file__).resolve().parents[1]


def run_aquila_without(module: str, *argv: str) -> subprocess.CompletedProcess:
    """`python -m aquila ARGV...` in a fresh interpreter where `module` cannot be imported."""
    code = f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv = ['aquila', *{list(argv)!r}]; "
    code += "runpy.run_module('aquila', run_name='__main__', alter_sys=True)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess, extra: str, feature: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f'error: {feature} needs the {extra!r} extra: pip install "aquila[{extra}]" ('), errors


@pytest.mark.parametrize("module", ["fastapi", "uvicorn", "prometheus_client"])
def test_aquila_serve_without_the_serve_extra(module, tmp_path):
    proc = run_aquila_without(module, "serve", "--model-dir", str(tmp_path))
    assert_one_error_line(proc, "serve", "aquila serve")
    assert proc.stderr.count("\n") == 1 and module in proc.stderr


def test_aquila_plot_without_matplotlib(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n')
    proc = run_aquila_without("matplotlib", "plot", str(tmp_path))
    assert_one_error_line(proc, "logging", "aquila plot")
    assert proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_pretrain_with_tensorboard_but_without_it_installed(tmp_path):
    cfg = pretrain_config(tmp_path, max_steps=1, tensorboard=True, tensorboard_dir=str(tmp_path / "tb"))
    proc = run_aquila_without("tensorboard", "pretrain", "--yaml_config", str(write_yaml(tmp_path / "c.yaml", cfg)))
    assert_one_error_line(proc, "logging", "tensorboard: True")


def test_bmtrain_backend_without_bmtrain(monkeypatch, capsys):
    from aquila.train import bmtrain_backend

    monkeypatch.setitem(sys.modules, "bmtrain", None)
    env = SimpleNamespace(device=torch.device("cuda", 0))  # bmtrain runs on CUDA only; nothing here touches it
    backend = bmtrain_backend.BMTrainBackend(env, SimpleNamespace(seed=0, fp16=False, bf16=None))
    assert run_command(backend.start) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: env_type bmtrain needs the 'bmtrain' extra: pip install \"aquila[bmtrain]\"")
    assert err.count("\n") == 1


def test_flash_attn_requested_on_cuda_without_it(monkeypatch):
    from aquila.train.distributed import resolve_env

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the check runs before anything touches CUDA
    cfg = SimpleNamespace(env_type="pytorch", pytorch_device=None, enable_flash_attn_models=True, fp16=False)
    with pytest.raises(AquilaError, match=r"enable_flash_attn_models: True needs the 'gpu' extra: pip install"):
        resolve_env(cfg)
    assert resolve_env(SimpleNamespace(**{**vars(cfg), "enable_flash_attn_models": False})).device.type == "cuda"


def test_int8_on_cuda_without_bminf_says_which_extra_and_falls_back(monkeypatch, capsys):
    from aquila.inference.loader import _use_bminf

    monkeypatch.setitem(sys.modules, "bminf", None)
    assert _use_bminf(torch.device("cuda")) is False
    err = capsys.readouterr().err
    assert err.startswith("note: int8 with BMInf's CUDA kernels needs the 'bminf' extra: pip install \"aquila[bminf]\"")
    assert err.endswith("using aquila's own int8 instead\n") and err.count("\n") == 1


def test_require_returns_the_module_when_present():
    assert require("fastapi", "x").__name__ == "fastapi"


def test_every_extra_named_exists_in_setup_py():
    setup = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    for module, extra in EXTRAS.items():
        packages = [req.split(">")[0].split("=")[0].replace("-", "_").lower() for req in extras[extra]]
        assert module in packages, (module, extra, packages)
