"""The launchers with the real training scripts: aquila-tiny for a few steps on the demo data, from a tmp PROJ_HOME
(so no checkpoints_out is left in the repo). YAMLs are the shipped tiny ones with absolute data paths and fewer steps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aquila.errors import AquilaError
from aquila.launch import jobs
from tests.test_launcher import EXAMPLES, launcher_env, run, save_dir_of, wait_for

REPO = EXAMPLES.parents[1]


def tiny_yaml(proj: Path, name: str, **overrides) -> str:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    data.update({"tokenizer_dir": str(EXAMPLES / "demo_tokenizer"), "log_interval": 1, "seq_length": 64, **overrides})
    (proj / name).write_text(yaml.safe_dump(data))
    return name


def real_env() -> dict[str, str]:
    env = launcher_env(AQUILA_PYTHON=sys.executable)
    del env["SCRIPT_FILE"]  # the launcher picks aquila_pretrain.py / aquila_sft.py from the YAML
    return env


@pytest.mark.slow
def test_pretrain_tiny_one_node_two_processes(tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=2\n")
    cfg = tiny_yaml(
        tmp_path,
        "Aquila-pretrain-tiny.yaml",
        data_prefix=str(REPO / "examples" / "indexed_dataset" / "data" / "demo_text_document"),
        max_steps=4,
        save_interval=2,
        batch_size=2,
        eval_interval=1000,
        env_type="fsdp",
    )
    r = run("local_trigger_docker.sh", "--follow", "hostfile", cfg, "aquila-tiny", "demo", cwd=tmp_path, env=real_env())
    assert r.returncode == 0, r.stdout + r.stderr
    save_dir = save_dir_of(r.stdout)
    assert "aquila_pretrain.py --not_call_launch" in r.stdout and "fsdp on 2 x cpu" in r.stdout
    assert (save_dir / "latest_iteration.txt").read_text().split()[0] == "4"
    step = save_dir / "4"
    for f in ("pytorch_model.bin", "config.json", "tokenizer.json"):
        assert (step / f).is_file(), f
    assert json.loads((step / "config.json").read_text())["dim"] == 256
    assert (save_dir / cfg).is_file() and (save_dir / "hostfile").is_file()


@pytest.mark.slow
def test_sft_tiny_two_local_nodes(tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    cfg = tiny_yaml(
        tmp_path, "Aquila-sft-tiny.yaml", enable_sft_dataset_dir=str(EXAMPLES / "data"), max_steps=2, env_type="fsdp"
    )
    r = run("dist_trigger_docker.sh", "--follow", "hostfile", cfg, "aquila-tiny", "chat", cwd=tmp_path, env=real_env())
    assert r.returncode == 0, r.stdout + r.stderr
    save_dir = save_dir_of(r.stdout)
    assert "aquila_sft.py --not_call_launch" in r.stdout and "fsdp on 2 x cpu" in r.stdout
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 1" in (save_dir / "launch" / "node1.log.txt").read_text()
    assert (save_dir / "latest_iteration.txt").read_text().split()[0] == "2"
    assert (save_dir / "2" / "pytorch_model.bin").is_file()


def pretrain_yaml(proj: Path, **overrides) -> str:
    data = str(REPO / "examples" / "indexed_dataset" / "data" / "demo_text_document")
    common = dict(data_prefix=data, batch_size=2, eval_interval=1000, env_type="pytorchDDP")
    return tiny_yaml(proj, "Aquila-pretrain-tiny.yaml", **{**common, **overrides})


SLOW = pytest.mark.slow  # these get past the parser: the trainer's checks import torch


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lrr": 3.0e-4}, "Aquila-pretrain-tiny.yaml: unknown key 'lrr'"),  # the trainer's parser, before torch
        ({"lr": -1.0}, "lr must be a positive number, got -1.0"),
        pytest.param({"data_prefix": "nowhere/text_document"}, "data_prefix 'nowhere/text_document': ", marks=SLOW),
        pytest.param({"tokenizer_dir": "no_tokenizer"}, "tokenizer_dir no_tokenizer: directory not found", marks=SLOW),
        pytest.param({"seq_length": 4096}, "seq_length 4096 is above the model's max_seq_len", marks=SLOW),
        pytest.param({"load_dir": "no_run"}, "load_dir no_run: directory not found", marks=SLOW),
    ],
)
def test_trigger_checks_the_yaml_with_the_trainers_own_parser(tmp_path, overrides, message):
    """Nothing starts: one error line and exit 2 from the trigger (it used to print "started", exit 0, and leave the
    error in the log inside a torchrun traceback)."""
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=2\n")
    cfg = pretrain_yaml(tmp_path, **overrides)
    r = run("dist_trigger_docker.sh", "hostfile", cfg, "aquila-tiny", "demo", cwd=tmp_path, env=real_env())
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert r.stdout == "" and not (tmp_path / "checkpoints_out").exists()


@pytest.mark.slow
def test_trigger_checks_the_sft_data_before_starting(tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n")
    cfg = tiny_yaml(tmp_path, "Aquila-sft-tiny.yaml", enable_sft_dataset_dir=str(tmp_path / "none"))
    r = run("dist_trigger_docker.sh", "hostfile", cfg, "aquila-tiny", "chat", cwd=tmp_path, env=real_env())
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().startswith(f"error: SFT data {tmp_path / 'none'}/") and "file not found" in r.stderr
    assert not (tmp_path / "checkpoints_out").exists()


def trainers(job_id: str) -> list[int]:
    """The job's training processes (torchrun's workers), not torchrun or the node script."""
    found = []
    for pid in jobs.job_processes(job_id):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"aquila.launch.worker" in words and b"--nnodes" not in words:  # (torchrun's own command has both)
            found.append(pid)
    return found


def iteration_reached(log: Path, step: int) -> bool:
    done = re.findall(r" iteration +(\d+)/", log.read_text() if log.exists() else "")
    return bool(done) and int(done[-1]) >= step


@pytest.mark.slow
def test_stop_and_preemption_are_stops_with_the_step_and_the_same_command_resumes(tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=2\n")
    cfg = pretrain_yaml(tmp_path, max_steps=100000, save_interval=100000)
    command = ["bash", str(EXAMPLES / "dist_trigger_docker.sh"), "--follow", "hostfile", cfg, "aquila-tiny", "demo"]
    again = (
        f"run the same command to resume: bash dist_trigger_docker.sh hostfile {cfg} aquila-tiny demo (from {tmp_path})"
    )

    def latest_job() -> str | None:
        try:
            return jobs.job_id_for(jobs.find_save_dir(tmp_path, None, None))
        except AquilaError:
            return None

    def trigger_until_stopped(stop, after_step: int) -> tuple[Path, str, str, str]:
        before = latest_job()
        follow = subprocess.Popen(command, cwd=tmp_path, env=real_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            wait_for(lambda: latest_job() not in (None, before), 60, "the job record")
            save_dir = jobs.find_save_dir(tmp_path, None, None)  # the first run's, unless the hour changed
            log = save_dir / f"{cfg}.log.txt"
            wait_for(lambda: iteration_reached(log, after_step + 2), 240, f"iteration {after_step + 2}")
            job_id = jobs.job_id_for(save_dir)
            stop(job_id)
            out, err = follow.communicate(timeout=240)
        finally:
            follow.kill()
            for env_file in tmp_path.glob("checkpoints_out/*/*/launch/job.env"):
                jobs.stop_job(jobs.read_env_file(env_file)["JOB_ID"], timeout=5)
        assert follow.returncode == 75, out + err
        return save_dir, job_id, out, err

    # 1. dist_stop_docker.sh: a stop, with the step it saved
    stopped = {}

    def dist_stop(job_id: str) -> None:
        stopped["r"] = run("dist_stop_docker.sh", "hostfile", cwd=tmp_path, env=real_env())

    save_dir, job_id, out, err = trigger_until_stopped(dist_stop, 0)
    step = int((save_dir / "latest_iteration.txt").read_text().split()[0])
    assert f"stopped by SIGTERM at iteration {step}: checkpoint {save_dir}/{step}; exit status 75" in out
    report = f"stopped: job {job_id} was stopped by the stop scripts (SIGTERM) at iteration {step}; checkpoint "
    assert err.strip().splitlines() == [f"{report}{save_dir}/{step} saved; {again}"], err
    assert f"{report}{save_dir}/{step} saved; {again}" in stopped["r"].stdout
    assert "ChildFailedError" not in out and "FAILED" not in out and "error" not in err

    # 2. the same command resumes from it; SIGTERM to the training processes only (a preemption) is a stop too
    save_dir2, job_id, out, err = trigger_until_stopped(lambda j: [os.kill(p, 15) for p in trainers(j)], step)
    assert f"load_dir auto: resuming from {save_dir}/{step}" in out
    step2 = int((save_dir2 / "latest_iteration.txt").read_text().split()[0])
    assert step2 > step
    assert err.strip().splitlines() == [
        f"stopped: job {job_id} was stopped by SIGTERM to its training processes (a preemption) at iteration "
        f"{step2}; checkpoint {save_dir2}/{step2} saved; {again}"
    ], err
    assert "ChildFailedError" not in out and "FAILED" not in out


@pytest.mark.slow
def test_an_empty_yaml_is_one_error_line_from_the_trigger(tmp_path):
    """Whatever the trainer's parser says about it (its message is the trainer's), it says it before anything starts."""
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    r = run("dist_trigger_docker.sh", "hostfile", "empty.yaml", "aquila-tiny", "demo", cwd=tmp_path, env=real_env())
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == "" and not (tmp_path / "checkpoints_out").exists()
