"""bench/gpu_check.sh + bench/gpu_check.py on CPU: every part's code path with tiny shapes (--smoke), the offline
install of the shell wrapper, and a broken or slow part leaving the others' rows in the table."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from tests.train_helpers import REPO

BENCH = REPO / "bench"
PARTS = ("env", "tests", "train", "trainer", "decode", "fit7b")  # bench/gpu_check.py's PARTS


def gpu_check(*flags: str, timeout: int = 900) -> str:
    res = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def cells(table: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    return [r for r in rows if len(r) == 3]


def problems(table: str) -> list[list[str]]:
    return [r for r in cells(table) if r[2].startswith(("error", "FAILED"))]


def result(table: str, check: str) -> str:
    """The result cell of the first row whose check starts with `check`."""
    for _, name, value in cells(table):
        if name.startswith(check):
            return value
    raise AssertionError(f"no row {check!r} in:\n{table}")


@pytest.mark.slow
def test_cuda_tests_skip_with_a_reason_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the cuda tests run instead of skipping")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-rs", "-q", "-p", "no:cacheprovider"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:]
    assert "SKIPPED" in res.stdout and "no CUDA device" in res.stdout and " passed" not in res.stdout


def test_shell_wrapper_syntax():
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0


@pytest.fixture(scope="module")
def wrapper_run(tmp_path_factory):
    """bench/gpu_check.sh --smoke with a python whose pip only records its calls, running the env part and a decode
    part that fails (an unknown model): one run for the wrapper's test and the failing part's (each part starts
    its own python and torch)."""
    tmp_path = tmp_path_factory.mktemp("wrapper")
    calls = tmp_path / "pip-calls"
    fake_python = tmp_path / "python"
    fake_python.write_text(
        f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> {calls}; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake_python.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, AQUILA_PYTHON=str(fake_python), OUT=str(out))
    res = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--smoke", "--parts", "env,decode", "--decode-model", "no-such-model"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return res, calls, out


@pytest.mark.slow
def test_shell_wrapper_installs_offline_and_writes_the_table(wrapper_run):
    """The wrapper's pip call is offline, without dependencies or build isolation; the table lands in $OUT."""
    res, calls, out = wrapper_run
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    install = [line for line in calls.read_text().splitlines() if " -e ." in line]
    assert install and all(f in install[0] for f in ("--no-index", "--no-deps", "--no-build-isolation")), install
    table = (out / "gpu_check.md").read_text()
    assert "| env | torch " in table and result(table, "total time").endswith(" s")
    assert (out / "gpu_check.log").is_file()


@pytest.fixture(scope="module")
def smoke_table() -> str:
    """Every part in one gpu_check.py run, as on a GPU: its first phase runs env, tests and trainer at the same
    time, so both CPU cores work. --total-s leaves each part its own --smoke limit, as in a run of its own."""
    return gpu_check("--parts", ",".join(PARTS), "--decode-tuning", "--total-s", "3000", timeout=1500)


@pytest.mark.slow
def test_smoke_env_tests_and_decode_parts(smoke_table):
    table = smoke_table
    assert not problems(table), table
    assert result(table, "SDPA train (causal").startswith("ran FLASH_ATTENTION")
    assert result(table, "SDPA decode (mask").startswith("ran ")
    expected = "passed" if torch.cuda.is_available() else "skipped: no CUDA device"
    assert result(table, "cuda test test_kv_cache_decode_equals_full_forward[fp32]").startswith(expected)
    assert result(table, "cuda test test_fp16_loss_scaler_skips_overflow_steps").startswith(expected)
    for check in (
        "decode bf16 b1 eager",
        "decode bf16 b1 compiled (eager), tuned",
        "decode int8 b1",
        "decode bf16 b16",
    ):
        assert " tok/s" in result(table, check), table
    assert result(table, "decode int8 / bf16 compiled b1").endswith("x")


@pytest.mark.slow
def test_smoke_train_and_fit_parts(smoke_table):
    table = smoke_table
    assert not problems(table), table
    train = result(table, "train aquila-micro FSDP2 bfloat16/fp32")
    assert "ms/step" in train and "FSDP2 MixedPrecisionPolicy(param bf16, reduce fp32)" in train
    assert int(result(table, "train tokens/s").replace(",", "")) > 0
    assert result(table, "train MFU vs measured matmul peak").endswith("TFLOP/s)")
    assert "GiB" in result(table, "train peak memory")
    assert result(table, "fit aquila-micro one step seq 64").startswith("ok (")
    assert "GiB" in result(table, "fit aquila-micro peak memory")


@pytest.mark.slow
def test_smoke_trainer_part_resumes_exactly(smoke_table):
    table = smoke_table
    row = result(table, "trainer fsdp bf16 4 it + resume")
    assert row.startswith("ok in") and "checkpoints 2 and 4 written" in row and row.endswith("resumed at 2: exact")
    assert "(FSDP2 MixedPrecisionPolicy(param bf16, reduce fp32))" in row  # as the trainer logged it
    assert result(table, "trainer fsdp fp16").startswith("skipped: fp16 trains only on CUDA")


@pytest.mark.slow
def test_a_failing_part_keeps_the_other_rows(wrapper_run):
    res, _, out = wrapper_run
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    table = (out / "gpu_check.md").read_text()
    assert result(table, "torch").startswith(torch.__version__)
    assert result(table, "decode part").startswith(
        "error: exit status 1: aquila.errors.AquilaError: unknown model name"
    )


def import_gpu_check():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    return gpu_check


def test_cuda_tests_cut_short_keep_the_finished_outcomes():
    sys.path.insert(0, str(BENCH))
    try:
        from gpu_check_env import verbose_outcomes
    finally:
        sys.path.remove(str(BENCH))
    out = (
        "collected 10 items\n"
        "tests/test_cuda.py::test_bf16_logits_match_fp32 PASSED                  [ 10%]\n"
        "tests/test_cuda.py::test_kv_cache_decode_equals_full_forward[fp32] FAILED [ 20%]\n"
        "tests/test_cuda.py::test_compiled_decode_step_matches_eager "
    )
    assert verbose_outcomes(out) == [
        ("test_bf16_logits_match_fp32", "passed"),
        ("test_kv_cache_decode_equals_full_forward[fp32]", "failed"),
    ]


def test_smoke_shapes_yield_to_explicit_flags():
    args = import_gpu_check().parse_args(["--smoke", "--compile-backend", "inductor", "--decode-tokens=9"])
    assert (args.compile_backend, args.decode_tokens, args.train_model) == ("inductor", 9, "aquila-micro")


def test_a_part_past_its_time_limit_is_stopped():
    gpu_check = import_gpu_check()
    rows, problem = gpu_check.launch("env", ["--smoke"], 0.3, io.StringIO())
    assert rows == [] and problem == "error: stopped after its 0 s time limit"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--parts", "env,gpu"], "--parts: unknown gpu"),
        (["--budget", "decode=soon"], "--budget 'decode=soon': expected PART=SECONDS"),
        (["--budget", "gpu=10"], "--budget 'gpu=10': expected PART=SECONDS"),
    ],
)
def test_bad_flags_are_refused(flags, message):
    res = subprocess.run([sys.executable, "bench/gpu_check.py", *flags], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr
