"""Faults a cluster brings, injected: auto-resume across launcher runs, corrupt checkpoints, a full disk, bad data,
preemption by SIGTERM. Each checks that nothing is lost: the same losses after recovery where the data allows."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aquila.checkpoint import load_model_dir
from aquila.train import checkpointing
from aquila.train.loop import PREEMPTED_EXIT
from aquila.train.pretrain import main as pretrain_main
from tests.train_helpers import REPO, losses, make_indexed_dataset, pretrain_config, torchrun, write_yaml


def _pretrain(tmp_path: Path, name: str = "c.yaml", **overrides) -> int:
    return pretrain_main(["--yaml_config", str(write_yaml(tmp_path / name, pretrain_config(tmp_path, **overrides)))])


def _runs(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints_out" / "exp"


def test_auto_resume_across_runs_falls_back_past_a_corrupt_step(tmp_path, capsys):
    first = _runs(tmp_path) / "2026113001"
    assert _pretrain(tmp_path, max_steps=4, save_interval=2, save_dir=str(first)) == 0
    full = losses(first)
    weights = first / "4" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-10])  # the newest checkpoint is truncated
    capsys.readouterr()

    second = _runs(tmp_path) / "2026113002"  # the same launcher command, an hour later: a new run dir
    assert _pretrain(tmp_path, "r.yaml", max_steps=4, save_interval=2, save_dir=str(second)) == 0
    out = capsys.readouterr().out
    assert f"warning: skipping checkpoint {first / '4'}: {weights}: " in out and "truncated" in out
    assert f"load_dir auto: resuming from {first / '2'}" in out
    assert " done: 2 iterations (3-4) in " in out
    resumed = losses(second)
    assert sorted(resumed) == [3, 4] and all(resumed[k] == full[k] for k in (3, 4))

    assert _pretrain(tmp_path, "f.yaml", max_steps=4, save_dir=str(second), load_dir=None) == 0
    assert "load_dir null: starting fresh" in capsys.readouterr().out


def _truncate(step: Path) -> Path:
    path = step / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:100])
    return path


def _bad_header(step: Path) -> Path:
    path = step / "pytorch_model.bin"
    data = bytearray(path.read_bytes())
    data[8:12] = b"XXXX"  # same size, broken zip header
    path.write_bytes(bytes(data))
    return path


def _missing_shard(step: Path) -> Path:
    shard = next(p for p in (step / "optim").iterdir() if p.suffix == ".distcp")
    shard.unlink()
    return shard


@pytest.mark.parametrize("damage", [_truncate, _bad_header, _missing_shard])
def test_corrupt_checkpoint_named_before_training(tmp_path, capsys, damage):
    assert _pretrain(tmp_path, max_steps=2, save_interval=2) == 0
    bad = damage(tmp_path / "out" / "2")
    capsys.readouterr()
    (tmp_path / "out" / "metrics.jsonl").unlink()
    assert _pretrain(tmp_path, "r.yaml", max_steps=4, load_dir=str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: "), err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # stopped before the first step


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real_write = checkpointing.save_weights

    def write_until_full(state, directory, formats):
        if directory.name == ".4.partial":
            (directory / "pytorch_model.bin").write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "pytorch_model.bin"))
        real_write(state, directory, formats)

    monkeypatch.setattr(checkpointing, "save_weights", write_until_full)
    out = tmp_path / "out"
    assert _pretrain(tmp_path, max_steps=4, save_interval=2, num_checkpoints=1) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write checkpoint {out / '4'}: [Errno 28] No space left on device" in err
    assert "bytes and" in err and f"{out / '2'} is still the latest checkpoint" in err
    assert (out / "latest_iteration.txt").read_text().split()[0] == "2"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["2"]  # no partial dir; step 2 not pruned
    assert checkpointing.verify_checkpoint(out / "2")
    load_model_dir(out / "2")
    before = losses(out)

    monkeypatch.setattr(checkpointing, "save_weights", real_write)  # space freed: rerun the same command
    assert _pretrain(tmp_path, max_steps=4, save_interval=2, num_checkpoints=1) == 0
    after = losses(out)
    assert after[3] == before[3] and after[4] == before[4]
    assert (out / "latest_iteration.txt").read_text().split()[0] == "4"


def test_mismatched_bin_idx_caught_before_first_step(tmp_path, capsys):
    cfg = pretrain_config(tmp_path)
    make_indexed_dataset(tmp_path / "other", docs=30, seed=1)
    shutil.copy(tmp_path / "other.bin", cfg["data_prefix"] + ".bin")
    assert _pretrain(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {cfg['data_prefix']}.bin: " in err and "expected" in err
    assert not (tmp_path / "out").exists()


def _wait_for(proc: subprocess.Popen, needle: str, log: list[str], timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        log.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} not seen:\n{''.join(log)}")


def _preempt(cmd: list[str], tmp_path: Path, signal_target=None) -> tuple[int, str]:
    """Start training, SIGTERM it after its first logged iteration and again once it is saving; return (status, log)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    target = signal_target or (lambda pids: pids)
    _wait_for(proc, "elapsed time per iteration", log)
    pids = target([proc.pid])
    assert pids, "no process to signal"
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    _wait_for(proc, "stopping at iteration", log)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)  # a second SIGTERM during the save changes nothing
    rest, _ = proc.communicate(timeout=180)
    return proc.returncode, "".join(log) + rest


def _check_preempted_then_resume(tmp_path: Path, text: str, resume, signal_name: str = "SIGTERM") -> None:
    out = tmp_path / "out"
    step = int((out / "latest_iteration.txt").read_text().split()[0])
    assert 1 <= step < 12, text
    assert f"stopped by {signal_name} at iteration {step}: checkpoint {out / str(step)}; exit status 75" in text
    assert checkpointing.verify_checkpoint(out / str(step))
    assert not list(out.glob(".*partial"))
    assert resume() == 0  # the same command again: load_dir auto continues from the preemption checkpoint
    reference = losses(tmp_path / "ref")
    resumed = losses(out)
    assert all(resumed[k] == reference[k] for k in range(step + 1, 13)), (step, resumed, reference)


@pytest.mark.slow
def test_sigterm_one_process_saves_and_resumes_exactly(tmp_path):
    common = dict(max_steps=12, save_interval=1000)
    assert _pretrain(tmp_path, "ref.yaml", save_dir=str(tmp_path / "ref"), **common) == 0
    cfg = write_yaml(tmp_path / "c.yaml", pretrain_config(tmp_path, **common))
    cmd = [sys.executable, "-u", "-m", "aquila.train.pretrain", "--yaml_config", str(cfg)]
    status, text = _preempt(cmd, tmp_path)
    assert status == PREEMPTED_EXIT, text
    _check_preempted_then_resume(tmp_path, text, lambda: _pretrain(tmp_path, **common))


@pytest.mark.slow
def test_sigterm_to_one_of_two_ranks_stops_both_on_the_same_step(tmp_path):
    common = dict(max_steps=12, save_interval=1000, env_type="fsdp", batch_size=2)
    ref = write_yaml(tmp_path / "ref.yaml", pretrain_config(tmp_path, save_dir=str(tmp_path / "ref"), **common))
    assert torchrun(["--yaml_config", str(ref)]).returncode == 0
    cfg = write_yaml(tmp_path / "c.yaml", pretrain_config(tmp_path, **common))
    cmd = [sys.executable, "-u", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "aquila.train.pretrain", "--yaml_config", str(cfg)]

    def one_worker(proc_pid: list[int]) -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(proc_pid[0])], capture_output=True, text=True).stdout
        return sorted(int(p) for p in found.split())[-1:]  # the last worker started: rank 1

    status, text = _preempt(cmd, tmp_path, one_worker)
    assert status != 0 and f"exitcode  : {PREEMPTED_EXIT}" in text, text
    resume = lambda: torchrun(["--yaml_config", str(cfg)]).returncode  # noqa: E731
    _check_preempted_then_resume(tmp_path, text, resume, "a stop signal to another rank")  # rank 0 logs


def test_sigusr1_before_the_first_step_saves_step_0_and_resume_matches(tmp_path, monkeypatch, capsys):
    import contextlib

    from aquila.train.loop import StopFlag

    real = StopFlag.installed

    @contextlib.contextmanager
    def installed_then_signalled(self):
        with real(self):
            os.kill(os.getpid(), signal.SIGUSR1)  # the real handler, before iteration 1
            yield self

    monkeypatch.setattr(StopFlag, "installed", installed_then_signalled)
    assert _pretrain(tmp_path, max_steps=3) == PREEMPTED_EXIT
    out = capsys.readouterr().out
    assert f"stopped by SIGUSR1 at iteration 0: checkpoint {tmp_path / 'out' / '0'}; exit status 75" in out
    assert checkpointing.verify_checkpoint(tmp_path / "out" / "0")

    monkeypatch.setattr(StopFlag, "installed", real)
    assert _pretrain(tmp_path, max_steps=3) == 0
    assert _pretrain(tmp_path, "ref.yaml", max_steps=3, save_dir=str(tmp_path / "ref")) == 0
    assert losses(tmp_path / "out") == losses(tmp_path / "ref")


FULL_DISK_ON_RANK_0 = """
import errno, os, sys
from pathlib import Path
import aquila.train.checkpointing as ck
real = ck.save_weights
def full(state, directory, formats):
    if Path(directory).name == ".4.partial":
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "pytorch_model.bin"))
    real(state, directory, formats)
ck.save_weights = full  # only rank 0 writes the weights: rank 1 must learn of the failure, not hang
from aquila.train.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_full_disk_on_one_rank_stops_both_without_a_hang(tmp_path):
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_ON_RANK_0)
    cfg = write_yaml(tmp_path / "c.yaml", pretrain_config(tmp_path, max_steps=4, save_interval=2, env_type="fsdp"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run(
        [*cmd, "--yaml_config", str(cfg)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode != 0 and "exitcode  : 2" in res.stderr, res.stderr[-3000:]
    out = tmp_path / "out"
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"cannot write checkpoint {out / '4'}: [Errno 28] No space left on device" in errors[0]
    assert (out / "latest_iteration.txt").read_text().split()[0] == "2"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["2"]
    assert checkpointing.verify_checkpoint(out / "2")


def _flip_a_bit(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's data: same size, still a valid file
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "keys, subdir, part",
    [
        (dict(max_steps=4, save_optim=True), "optim", "in the optimizer state"),
        (dict(max_steps=6, save_optim=True, save_full_interval=6), "model", "in the weight shards"),  # 2, 4: shards
    ],
)
def test_full_disk_during_a_dcp_save_is_one_line(tmp_path, monkeypatch, capsys, keys, subdir, part):
    """DCP (the optimizer state; the weights between save_full_interval steps) wraps the OSError in a
    CheckpointException, a BaseException."""
    import torch.distributed.checkpoint.filesystem as dcp_fs

    real_write_item = dcp_fs._write_item

    def write_item_until_full(transforms, stream, data, write_item, *args):
        if f".4.partial/{subdir}/" in str(getattr(stream, "name", "")):
            stream.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_item(transforms, stream, data, write_item, *args)

    monkeypatch.setattr(dcp_fs, "_write_item", write_item_until_full)
    out = tmp_path / "out"
    assert _pretrain(tmp_path, save_interval=2, num_checkpoints=1, **keys) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write checkpoint {out / '4'}: "), err
    assert "No space left on device" in err and f"{out / '2'} is still the latest checkpoint" in err
    assert f"{part})" in err, err  # "(rank 0, in ...)" when DCP wraps the error, "(in ...)" when it does not
    assert sorted(p.name for p in out.iterdir()) == ["2", "latest_iteration.txt", "metrics.jsonl"]  # no .partial
    assert checkpointing.verify_checkpoint(out / "2")

    monkeypatch.setattr(dcp_fs, "_write_item", real_write_item)  # space freed: the same command continues
    before = losses(out)
    assert _pretrain(tmp_path, save_interval=2, num_checkpoints=1, **keys) == 0
    last = str(keys["max_steps"])
    assert losses(out)[3] == before[3] and (out / "latest_iteration.txt").read_text().split()[0] == last


def test_step_without_manifest_is_not_trusted(tmp_path, capsys):
    out = tmp_path / "out"
    assert _pretrain(tmp_path, max_steps=4, save_interval=2) == 0
    full = losses(out)
    (out / "4" / "manifest.json").unlink()
    _flip_a_bit(out / "4" / "pytorch_model.bin")
    capsys.readouterr()

    assert _pretrain(tmp_path, "x.yaml", max_steps=4, save_interval=2, load_dir=str(out / "4")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {out / '4'}: no manifest.json, so its files cannot be checked" in err
    assert f"python -m aquila.manifest write {out / '4'}" in err

    assert _pretrain(tmp_path, max_steps=4, save_interval=2) == 0  # load_dir auto: falls back to step 2
    text = capsys.readouterr().out
    assert f"warning: skipping checkpoint {out / '4'}: {out / '4'}: no manifest.json" in text
    assert f"load_dir auto: resuming from {out / '2'}" in text
    again = losses(out)
    assert again[3] == full[3] and again[4] == full[4]
    assert checkpointing.verify_checkpoint(out / "4")  # rewritten by the resumed run, with a manifest


def test_nan_stop_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from tests.test_train_run import _nan_on

    _nan_on(monkeypatch, lambda n: n >= 2)  # iterations 1-2 train, then every step is non-finite
    out = tmp_path / "out"
    assert _pretrain(tmp_path, max_steps=10, save_interval=2, num_checkpoints=1, nan_skip_limit=2) == 2
    err = capsys.readouterr().err
    assert f"checkpoint saved in {out / '4'} (older checkpoints are kept)" in err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["2", "4"]
    assert checkpointing.verify_checkpoint(out / "2")


def test_every_checkpoint_corrupt_refuses_to_start_over(tmp_path, capsys):
    out = tmp_path / "out"
    assert _pretrain(tmp_path, max_steps=4, save_interval=2) == 0
    before = (out / "metrics.jsonl").read_text()
    for step in ("2", "4"):
        _truncate(out / step)
    capsys.readouterr()
    assert _pretrain(tmp_path, max_steps=4, save_interval=2) == 2
    captured = capsys.readouterr()
    assert captured.out.count("warning: skipping checkpoint") == 2
    err = captured.err
    assert err.count("\n") == 1 and "all 2 checkpoints of" in err and "refusing to start over" in err
    assert "set load_dir: null (or --load_dir null)" in err
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    assert _pretrain(tmp_path, max_steps=4, save_interval=2, load_dir=None) == 0  # the user asks to start over
    assert "load_dir null: starting fresh" in capsys.readouterr().out


def test_loaders_check_a_steps_manifest(tmp_path, capsys):
    from aquila.checkpoint import ModelDir
    from aquila.cli import main as cli_main
    from aquila.errors import AquilaError

    assert _pretrain(tmp_path, max_steps=2, save_interval=2) == 0
    step = tmp_path / "out" / "2"
    ModelDir.open(step)  # intact
    bad = _flip_a_bit(step / "pytorch_model.bin")
    capsys.readouterr()
    assert cli_main(["convert", str(step), str(tmp_path / "hf"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}: checksum differs from {step / 'manifest.json'} (corrupt file)\n"
    assert not (tmp_path / "hf").exists()
    with pytest.raises(AquilaError, match="checksum differs"):
        load_model_dir(step)
    _flip_a_bit(bad)  # restored: the cache of verified directories notices the change
    load_model_dir(step)
    shutil.rmtree(step / "optim")  # a step's optim/ and rng/ states are not a model loader's concern
    load_model_dir(step)


def test_second_run_on_one_save_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert _pretrain(tmp_path, max_steps=2, save_interval=2) == 0
    before = sorted(p.name for p in out.iterdir())
    assert checkpointing.LOCK_NAME not in before  # released and removed
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    with checkpointing.save_dir_lock(out, is_main=True):  # the first run, still training
        assert _pretrain(tmp_path, max_steps=4, save_interval=2) == 2
        err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: save_dir {out} is in use by another run (pid {os.getpid()} on " in err
    assert "choose another save_dir" in err
    assert (out / "metrics.jsonl").read_text() == metrics and sorted(p.name for p in out.iterdir()) == before


def test_save_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("not a directory")
    assert _pretrain(tmp_path, max_steps=1) == 2
    assert capsys.readouterr().err == f"error: save_dir {tmp_path / 'out'}: exists and is not a directory\n"


def test_resumed_run_logs_the_same_windows_as_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """Stopped at iteration 3 with log_interval 2: the resumed run's window 3-4 still averages both iterations."""
    import json

    from aquila.train.loop import Trainer

    common = dict(max_steps=6, log_interval=2, save_interval=1000)
    assert _pretrain(tmp_path, "ref.yaml", save_dir=str(tmp_path / "ref"), **common) == 0
    real_step = Trainer.train_step

    def stop_after_3(self, step):
        result = real_step(self, step)
        if step == 2:
            self.stop.signal_name = "SIGTERM"
        return result

    monkeypatch.setattr(Trainer, "train_step", stop_after_3)
    assert _pretrain(tmp_path, **common) == PREEMPTED_EXIT
    assert (tmp_path / "out" / "latest_iteration.txt").read_text().split()[0] == "3"
    monkeypatch.setattr(Trainer, "train_step", real_step)
    capsys.readouterr()
    assert _pretrain(tmp_path, **common) == 0
    done = next(line for line in capsys.readouterr().out.splitlines() if " done: " in line)

    def records(save_dir):
        keys = ("step", "loss", "grad_norm", "lr", "nan_skipped")
        lines = (tmp_path / save_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: json.loads(line)[k] for k in keys} for line in lines if json.loads(line)["kind"] == "train"]

    ref, resumed = records("ref"), records("out")
    assert [r["step"] for r in ref] == [2, 4, 6] and resumed == ref  # bitwise: fp32 CPU, the same sums
    assert done.endswith(
        f"| first loss {ref[1]['loss']:.4f} | last loss {ref[2]['loss']:.4f} (logged means over log_interval 2)"
    )


@pytest.mark.slow
def test_a_lost_rng_file_of_rank_1_falls_back_to_the_previous_step(tmp_path):
    """rng/rank1.pt is read by rank 1 alone: every rank checks all ranks' files first (used to be silent on rank 1,
    a gloo traceback on rank 0, and the same on every rerun)."""
    from aquila.manifest import write_manifest

    common = dict(max_steps=2, save_interval=1, env_type="pytorchDDP", batch_size=2)
    cfg = write_yaml(tmp_path / "c.yaml", pretrain_config(tmp_path, **common))
    assert torchrun(["--yaml_config", str(cfg)]).returncode == 0
    full = losses(tmp_path / "out")
    step = tmp_path / "out" / "2"
    (step / "rng" / "rank1.pt").unlink()
    write_manifest(step)  # the manifest agrees: only a check of the RNG files can notice
    res = torchrun(["--yaml_config", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"warning: skipping checkpoint {step}: {step / 'rng' / 'rank1.pt'}: missing (load_rng is set" in res.stdout
    assert f"load_dir auto: resuming from {tmp_path / 'out' / '1'}" in res.stdout
    assert losses(tmp_path / "out")[2] == full[2]


ON_EVERY_RANK = """
import torch.distributed as dist
from aquila.errors import AquilaError, run_command
from aquila.train.distributed import on_every_rank, resolve_env
from aquila.train.config import TrainConfig

dist.init_process_group("gloo")
env = resolve_env(TrainConfig())

def only_rank_1():
    if env.rank == 1:
        raise AquilaError("a file only rank 1 reads is missing")
    return "ok"

rc = run_command(lambda: on_every_rank(only_rank_1, env))
dist.destroy_process_group()
raise SystemExit(rc)
"""


@pytest.mark.slow
def test_an_error_only_rank_1_sees_is_raised_on_every_rank(tmp_path):
    script = tmp_path / "on_every_rank.py"
    script.write_text(ON_EVERY_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: rank 1: a file only rank 1 reads is missing"], res.stderr[-3000:]
    assert res.returncode != 0 and "Traceback" not in res.stderr.split("error: rank 1")[0]  # no rank's traceback
