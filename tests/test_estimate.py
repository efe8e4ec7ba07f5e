"""`aquila estimate` against measured runs: the same MemTracker on real tensors, 1 and 2 gloo processes."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import aquila.train.estimate as estimate_module
from aquila.config import ModelArgs
from aquila.train.config import TrainConfig
from aquila.train.estimate import Target, estimate, fake_process_group, parse_size
from aquila.typed_config import from_dict

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("estimate_worker.py")
TINY = {"dim": 256, "n_layers": 4, "n_heads": 8, "vocab_size": 16008, "multiple_of": 32, "max_seq_len": 512}
SEQ = 128
CASES = [
    {"env_type": env, "batch_size": 2, "checkpoint_activations": ckpt, "gradient_accumulation_steps": accum}
    for env in ("pytorchDDP", "fsdp")
    for ckpt, accum in ((False, 1), (True, 2))
]
TOLERANCE = 0.15  # the bound for estimate vs measured peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_measuring(world: int, logs: Path) -> tuple[subprocess.Popen, Path, Path]:
    """The real steps of CASES in `world` gloo processes, started now (their own session, output to files)."""
    cmd = [sys.executable, str(WORKER), json.dumps(TINY), str(SEQ), *map(json.dumps, CASES)]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={free_port()}", *cmd[1:]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out, err = logs / f"world{world}.out", logs / f"world{world}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
    return proc, out, err


@pytest.fixture(scope="module", autouse=True)
def measuring(request, tmp_path_factory):
    """world -> its measurement, started as this module begins for each world a selected test compares: the
    real steps run in other processes (the second core) while the tests before it run their fake steps here."""
    wanted = sorted(
        item.callspec.params["world"]
        for item in request.session.items
        if item.module is request.module and item.originalname == "test_estimate_within_15_percent_of_measured_peak"
    )
    logs = tmp_path_factory.mktemp("measured")
    started = {world: start_measuring(world, logs) for world in wanted}
    yield started
    for proc, _, _ in started.values():
        if proc.poll() is None:  # a test stopped early: no orphaned torchrun workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measured(world: int, measuring: dict) -> list[dict]:
    proc, out, err = measuring[world]
    returncode = proc.wait(timeout=600)
    assert returncode == 0, err.read_text()[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]


def config(case: dict) -> TrainConfig:
    return from_dict(TrainConfig, {"max_steps": 1, **case}, "case")


_FAKE_STEPS: dict[str, object] = {}
_step_memory = estimate_module.step_memory


def step_memory(cfg, args, target, seq_length, fake=True):
    """estimate's fake step, each (config, model, target, seq) run once per session: it is deterministic, and the
    tests here ask for the same 4-block world-2 steps several times (about 4 s each on a busy core)."""
    if not fake:
        return _step_memory(cfg, args, target, seq_length, fake=False)
    key = repr((cfg, args, target, seq_length))
    if key not in _FAKE_STEPS:
        _FAKE_STEPS[key] = _step_memory(cfg, args, target, seq_length)
    return copy.deepcopy(_FAKE_STEPS[key])


@pytest.fixture(autouse=True)
def shared_fake_steps(monkeypatch):
    monkeypatch.setattr(estimate_module, "step_memory", step_memory)


def test_extrapolated_depth_equals_full_depth():
    """Measured at 3 and 4 blocks and extrapolated to 7 equals the 7-block fake run: every block adds the same."""
    args = from_dict(ModelArgs, {**TINY, "n_layers": 7}, "model")
    for case in CASES:
        cfg = config(case)
        target = Target(2, "cpu", None, 0)
        with fake_process_group(2):
            full = step_memory(cfg, args, target, SEQ)
        extrapolated = estimate(cfg, args, target, SEQ)
        assert extrapolated.peak == pytest.approx(full.peak, rel=0.01), case


def test_estimate_sees_what_lowers_memory():
    args = from_dict(ModelArgs, TINY, "model")
    target = Target(2, "cpu", None, 0)
    base = estimate(config({"env_type": "fsdp", "batch_size": 8}), args, target, 256)
    ckpt = estimate(config({"env_type": "fsdp", "batch_size": 8, "checkpoint_activations": True}), args, target, 256)
    wider = estimate(config({"env_type": "fsdp", "batch_size": 8}), args, Target(4, "cpu", None, 0), 256)
    act = "forward/backward"
    # 4 blocks: the loss chunk and the last block stay; the saved block internals go
    assert ckpt.phases[act]["Activation"] < 0.6 * base.phases[act]["Activation"]
    assert wider.phases["optimizer step"]["Optstate"] < base.phases["optimizer step"]["Optstate"]


# What a fresh `python` shows of warnings (none of these filters comes from pytest's).
PYTHON_WARNING_FILTERS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                          ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                          ("ignore", ResourceWarning, ""))  # fmt: skip


@pytest.fixture
def run_cli(monkeypatch, capfd):
    """`aquila estimate ARGV` from examples/aquila in this process (a subprocess would import torch again, ~3 s
    each): its exit status and what it wrote to fds 1 and 2, warnings included as a fresh process prints them.
    `python -m aquila` itself runs in other tests' subprocesses (test_checkpoint_errors, test_inference_cli)."""
    import torch

    from aquila.cli import main

    monkeypatch.chdir(ROOT / "examples" / "aquila")
    threads = torch.get_num_threads()

    def run(*argv: str) -> subprocess.CompletedProcess:
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            for action, category, module in reversed(PYTHON_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            try:
                status = main(["estimate", *argv])
            except SystemExit as e:  # argparse's usage errors
                status = e.code
            finally:
                torch.set_num_threads(threads)  # estimate's main sets 1 thread for its own process
        out = capfd.readouterr()
        shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
        return subprocess.CompletedProcess(argv, status, out.out, out.err + shown)

    return run


@pytest.mark.slow
def test_cli_7b_on_8_gpus_and_what_fits_on_one(tmp_path, run_cli):
    out = run_cli("--yaml_config", "Aquila-pretrain.yaml", "--model_name", "aquila-7b", "--gpus", "8")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "aquila-7b (7,295.5M params), env_type fsdp on 8 x cuda, fp16" in out.stdout
    assert "fits" in out.stdout.splitlines()[-1]
    one = tmp_path / "one-gpu.yaml"
    one.write_text("env_type: fsdp\nfp16: True\nbatch_size: 4\nseq_length: 2048\nmax_steps: 1\n")
    small = run_cli("--yaml_config", str(one), "--model_name", "aquila-7b", "--gpus", "1", "--gpu-memory", "24GiB")
    assert small.returncode == 1, small.stdout + small.stderr
    assert "does NOT fit" in small.stdout and "what would fit:" in small.stdout
    assert "checkpoint_activations: True" in small.stdout


def test_cli_bad_input_is_one_line(tmp_path, run_cli):
    out = run_cli("--yaml_config", "Aquila-pretrain-tiny.yaml", "--gpu-memory", "lots")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: memory size 'lots': expected a number with a unit, e.g. 80GiB"
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("lrr: 3.0e-4\n")
    out = run_cli("--yaml_config", str(bad))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "lrr" in out.stderr


def test_parse_size():
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("24g") == 24 * 2**30
    assert parse_size("1000") == 1000


def test_cpu_offload_moves_shards_and_optimizer_state_to_the_host():
    args = from_dict(ModelArgs, TINY, "model")
    target = Target(2, "cpu", None, 0)
    on_device = estimate(config({"env_type": "fsdp", "batch_size": 2}), args, target, SEQ)
    offload = estimate(config({"env_type": "fsdp", "batch_size": 2, "bmt_cpu_offload": True}), args, target, SEQ)
    shard = args.num_params() * 4 // 2  # fp32 parameters, half on rank 0
    assert offload.host == pytest.approx(2 * shard + on_device.phases["optimizer step"]["Optstate"], rel=0.01)
    assert offload.peak < on_device.peak - shard
    assert offload.phases["optimizer step"]["Optstate"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_estimate_within_15_percent_of_measured_peak(world, measuring):
    """Last in this file: its measurements (started with the module) have run meanwhile."""
    args = from_dict(ModelArgs, TINY, "model")
    rows = measured(world, measuring)
    assert [r["case"] for r in rows] == CASES
    for row in rows:
        est = estimate(config(row["case"]), args, Target(world, "cpu", None, 0), SEQ)
        err = est.peak / row["peak"] - 1
        print(f"{world} x {row['case']}: estimate {est.peak / 2**20:.1f} MiB, measured {row['peak'] / 2**20:.1f} MiB"
              f" ({err:+.1%}), RSS growth {row['rss_growth'] / 2**20:.1f} MiB")  # fmt: skip
        assert abs(err) <= TOLERANCE, (row["case"], est.peak, row["peak"])
