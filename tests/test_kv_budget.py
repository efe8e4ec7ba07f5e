"""The KV pool's size (`kv_budget`, `aquila serve --kv-cache-gb`), /health's kv_cache and --no-prefix-cache."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aquila.cli import main as cli_main
from aquila.errors import AquilaError
from aquila.inference.kv_budget import GIB, bytes_per_position, kv_budget, mem_available
from aquila.serve.app import ServerLimits, create_app
from tests.test_inference import load_predictor, single_thread, write_checkpoint

LIMITS = ServerLimits(max_prompt_tokens=60, max_new_tokens=20, max_batch=2, max_queue=2, max_time_s=30)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def predictor(ckpt):
    return load_predictor(ckpt)


def meminfo(tmp_path: Path, available_bytes: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {available_bytes // 1024} kB\n")
    return path


def test_default_is_the_full_rows_or_half_of_mem_available(predictor, tmp_path):
    model = predictor.model
    per_block = 16 * bytes_per_position(model)
    assert bytes_per_position(model) == 2 * 2 * 4 * 16 * 4  # layers, k+v, kv heads, head dim, fp32
    big = kv_budget(model, 4, 80, meminfo=meminfo(tmp_path, 64 * GIB))
    assert (big.blocks, big.block_size, big.positions) == (20, 16, 320)  # 4 rows x 80 positions, in blocks
    assert big.bytes == 21 * per_block and "4 rows x 80 positions" in big.describe()
    small = kv_budget(model, 4, 80, meminfo=meminfo(tmp_path, 24 * per_block))  # half: 12 blocks with scratch
    assert small.blocks == 11 and "half of MemAvailable" in small.describe()
    absent = kv_budget(model, 4, 80, meminfo=tmp_path / "missing")
    assert absent.blocks == 20 and mem_available(tmp_path / "missing") is None


def test_explicit_budget_and_its_two_errors(predictor, tmp_path):
    model = predictor.model
    per_block = 16 * bytes_per_position(model)
    b = kv_budget(model, 4, 80, cache_gb=10 * per_block / GIB, meminfo=meminfo(tmp_path, GIB))
    assert b.blocks == 9 and b.bytes == 10 * per_block and "--kv-cache-gb" in b.describe()
    with pytest.raises(AquilaError, match=r"holds less than one request of 80 positions: --kv-cache-gb must be at"):
        kv_budget(model, 4, 80, cache_gb=5 * per_block / GIB)  # 4 blocks after scratch, 5 needed
    with pytest.raises(AquilaError, match=r"--kv-cache-gb 2 is above the 1.00 GiB of MemAvailable"):
        kv_budget(model, 4, 80, cache_gb=2, meminfo=meminfo(tmp_path, GIB))
    with pytest.raises(AquilaError, match="holds less than one request"):  # half the RAM is less than one request
        kv_budget(model, 4, 80, meminfo=meminfo(tmp_path, 8 * per_block))


def _serve_error(ckpt: Path, capsys, *flags: str) -> str:
    argv = ["serve", "--model-dir", str(ckpt.parent), "--model-name", ckpt.name, "--max-prompt-tokens", "60"]
    assert cli_main([*argv, "--max-new-tokens", "20", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_serve_budget_errors_exit_2_with_one_line(ckpt, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    err = _serve_error(ckpt, capsys, "--kv-cache-gb", "0.00001")
    minimum = float(err.rsplit(" ", 1)[1])  # 80 positions = 5 blocks + scratch of 16 KiB each: 96 KiB
    assert "--kv-cache-gb must be at least" in err and 6 * 16 * 1024 / GIB <= minimum < 1.01 * 6 * 16 * 1024 / GIB
    assert "above the" in _serve_error(ckpt, capsys, "--kv-cache-gb", "100000")
    assert "--kv-cache-gb must be positive" in _serve_error(ckpt, capsys, "--kv-cache-gb", "0")


def test_serve_prints_one_kv_line_and_health_reports_it(ckpt, capsys, monkeypatch):
    import gc

    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app))
    argv = ["--model-dir", str(ckpt.parent), "--model-name", ckpt.name, "--max-batch", "2", "--no-pack"]
    from aquila.serve.app import main

    try:
        assert main([*argv, "--kv-cache-gb", str(20 * 16 * 1024 / GIB), "--no-prefix-cache"]) == 0
    finally:
        gc.unfreeze()
    frontend = started["app"].state.frontend
    try:
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("KV cache:")]
        assert lines == ["KV cache: 19 blocks x 16 positions = 304 positions, 0.00 GiB (--kv-cache-gb 0.000305176;"
                         " --kv-cache-gb to change); prefix cache off"]  # fmt: skip
        with TestClient(started["app"]) as client:
            health = client.get("/health").json()
        assert health["kv_cache"] == {"blocks": 19, "block_size": 16, "bytes": 20 * 16 * 1024}
        assert frontend.engine.batch.pool.blocks == 19 and not frontend.engine.batch.pool.prefix_cache
    finally:
        frontend.close()


def test_no_prefix_cache_gives_the_same_tokens(predictor):
    prompt = "a system prompt that is longer than one block of sixteen ids, " * 2
    answers = {}
    for sharing in (True, False):
        app = create_app(predictor, ServerLimits(**{**LIMITS.__dict__, "prefix_cache": sharing}))
        with TestClient(app) as client:
            health = client.get("/health").json()["kv_cache"]
            assert health["blocks"] == 2 * 80 // 16 and health["block_size"] == 16
            texts = []
            for suffix in ("first", "second"):
                body = {"prompt": prompt + suffix, "max_tokens": 8, "temperature": 0}
                texts.append(client.post("/v1/completions", json=body).json()["choices"][0]["text"])
            hits = app.state.frontend.engine.batch.pool.prefix_hits
        answers[sharing] = texts
        assert (hits > 0) == sharing
    assert answers[True] == answers[False]
