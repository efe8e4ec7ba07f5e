"""Launchers in examples/aquila: hostfile validation, node ranks, ssh commands, stop, with a stand-in script.

The end-to-end runs with the real training script are in test_launcher_train.py."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aquila.config import PRESETS
from aquila.errors import AquilaError
from aquila.launch import hostfile as hf
from aquila.launch import jobs, ports

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "aquila"
STUB = Path(__file__).resolve().parent / "launcher_stub.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """A PROJ_HOME (with a space in its path) holding a one-node hostfile and a small YAML; launchers run here."""
    tmp_path = tmp_path / "proj dir"
    tmp_path.mkdir()
    (tmp_path / "hostfile").write_text("# test\n127.0.0.1 slots=2\n")
    (tmp_path / "cfg.yaml").write_text("batch_size: 2\n")
    return tmp_path


def launcher_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STUB_", "AQUILA_", "MASTER_"))}
    env.pop("SCRIPT_FILE", None)
    env.update(AQUILA_PYTHON=sys.executable, SCRIPT_FILE=str(STUB), MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


def run(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        ["bash", str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env or launcher_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def save_dir_of(out: str) -> Path:
    logfile = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("LOGFILE: "))
    return Path(logfile).parent


def records(save_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((save_dir / "stub").glob("rank*.json"))]


def wait_for(cond, timeout: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


# --- hostfile parsing and checks (in-process) -----------------------------------------------------------------


def test_parse_hostfile_comments_blank_lines_and_order(tmp_path):
    p = tmp_path / "hostfile"
    p.write_text("# cluster\n\n10.0.0.2 slots=8  # master\n   \nnode-b slots=4\n")
    nodes = hf.parse_hostfile(p)
    assert [(n.rank, n.address, n.slots, n.line) for n in nodes] == [(0, "10.0.0.2", 8, 3), (1, "node-b", 4, 5)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("10.0.0.1\n", "line 1: expected '<address> slots=<n>'"),
        ("10.0.0.1 gpus=2\n", "line 1: expected '<address> slots=<n>'"),
        ("10.0.0.1 slots=1 slots=2\n", "expected '<address> slots=<n>'"),
        ("10.0.0.1 slots=0\n", "slots must be a positive integer, got 0"),
        ("10.0.0.1 slots=two\n", "slots must be a positive integer, got 'two'"),
        ("10.0.0.1 slots=-1\n", "slots must be a positive integer"),
        ("10.0.0.1 slots=1\n# x\n10.0.0.1 slots=1\n", "line 3: duplicate host '10.0.0.1' (already on line 1)"),
        ("# only comments\n\n", "no '<address> slots=<n>' lines"),
        ("user@host slots=1\n", "is not a host name or IP address"),
    ],
)
def test_parse_hostfile_errors(tmp_path, text, message):
    p = tmp_path / "hostfile"
    p.write_text(text)
    with pytest.raises(AquilaError, match=None) as e:
        hf.parse_hostfile(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_local_address_detection():
    for addr in ("127.0.0.1", "127.0.0.2", "localhost", "::1", socket.gethostname()):
        assert hf.is_local_address(addr), addr
    for addr in ("10.255.255.1", "192.0.2.254", "no-such-host.invalid"):
        assert not hf.is_local_address(addr), addr


def test_sft_rule_and_script_override(tmp_path, monkeypatch):
    monkeypatch.delenv("SCRIPT_FILE", raising=False)
    assert hf.is_sft_config("Aquila-sft-lora.yaml", {})
    assert hf.is_sft_config("Aquila-chat.yaml", {})
    assert hf.is_sft_config("my.yaml", {"enable_sft_dataset_file": "x.jsonl"})
    assert not hf.is_sft_config("Aquila-pretrain-tiny.yaml", {"data_prefix": "x"})
    (tmp_path / "aquila_pretrain.py").write_text("")
    (tmp_path / "aquila_sft.py").write_text("")
    assert hf.choose_script("a-sft.yaml", {}, tmp_path).name == "aquila_sft.py"
    assert hf.choose_script("a.yaml", {}, tmp_path).name == "aquila_pretrain.py"
    monkeypatch.setenv("SCRIPT_FILE", str(STUB))
    assert hf.choose_script("a-sft.yaml", {}, tmp_path) == STUB
    monkeypatch.setenv("SCRIPT_FILE", "missing.py")
    with pytest.raises(AquilaError, match="SCRIPT_FILE 'missing.py': file not found"):
        hf.choose_script("a.yaml", {}, tmp_path)


def test_model_name_preset_or_checkpoints_in(tmp_path):
    assert hf.check_model("Aquila-7B", tmp_path) == "preset aquila-7b"
    (tmp_path / "checkpoints_in" / "mine").mkdir(parents=True)
    with pytest.raises(AquilaError, match="no .*checkpoints_in/mine/config.json and no preset"):
        hf.check_model("mine", tmp_path)
    (tmp_path / "checkpoints_in" / "mine" / "config.json").write_text("{}")
    assert hf.check_model("mine", tmp_path).endswith("checkpoints_in/mine/config.json")
    with pytest.raises(AquilaError, match="no preset of that name"):
        hf.check_model("aquila-8b", tmp_path)


# --- bad inputs through the trigger: one-line error, exit 2, nothing started ------------------------------------


@pytest.mark.parametrize(
    "hostfile, config, model, exp, message",
    [
        (None, "cfg.yaml", "aquila-tiny", "e", "hostfile {proj}/nohostfile: file not found"),
        ("127.0.0.1\n", "cfg.yaml", "aquila-tiny", "e", "line 1: expected '<address> slots=<n>'"),
        ("127.0.0.1 slots=1\n127.0.0.1 slots=1\n", "cfg.yaml", "aquila-tiny", "e", "duplicate host '127.0.0.1'"),
        ("127.0.0.1 slots=0\n", "cfg.yaml", "aquila-tiny", "e", "slots must be a positive integer, got 0"),
        ("127.0.0.1 slots=2.5\n", "cfg.yaml", "aquila-tiny", "e", "slots must be a positive integer, got '2.5'"),
        ("127.0.0.1 slots=1\n", "missing.yaml", "aquila-tiny", "e", "config {proj}/missing.yaml: file not found"),
        ("127.0.0.1 slots=1\n", "bad.yaml", "aquila-tiny", "e", "not valid YAML"),
        ("127.0.0.1 slots=1\n", "cfg.yaml", "aquila-8b", "e", "model_name 'aquila-8b': no "),
        ("127.0.0.1 slots=1\n", "cfg.yaml", "aquila-tiny", "a/b", "experiment name 'a/b' may only contain"),
        # names that used to reach argparse ('-rf'), get a message listing '.' as allowed, or a traceback (300)
        ("127.0.0.1 slots=1\n", "cfg.yaml", "aquila-tiny", "-rf", "experiment name '-rf' must not start with '-'"),
        ("127.0.0.1 slots=1\n", "cfg.yaml", "-x", "e", "model name '-x' must not start with '-'"),
        ("127.0.0.1 slots=1\n", "cfg.yaml", "aquila-tiny", ".", "experiment name '.' is not allowed: '.' and '..'"),
        ("127.0.0.1 slots=1\n", "cfg.yaml", "aquila-tiny", "..", "experiment name '..' is not allowed"),
        (
            "127.0.0.1 slots=1\n",
            "cfg.yaml",
            "aquila-tiny",
            "a" * 300,
            "experiment name is 300 characters long; it names a directory, so at most 255 are allowed",
        ),
        (
            "127.0.0.1 slots=1\n10.255.255.1 slots=1\n",
            "cfg.yaml",
            "aquila-tiny",
            "e",
            "master 127.0.0.1 is a loopback address but other nodes are remote",
        ),
    ],
)
def test_trigger_rejects_bad_input(proj, hostfile, config, model, exp, message):
    (proj / "bad.yaml").write_text("batch_size: [1\n")
    hostname = "nohostfile"
    if hostfile is not None:
        hostname = "hf"
        (proj / hostname).write_text(hostfile)
    r = run("dist_trigger_docker.sh", hostname, config, model, exp, cwd=proj)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message.format(proj=proj) in lines[0]
    assert not (proj / "checkpoints_out").exists()


@pytest.mark.parametrize("args", [["-rf"], [".", "v"], ["e", "-v"]])
def test_stop_scripts_reject_bad_names_in_one_line(proj, args):
    for script, hostfile in (("local_stop_docker.sh", []), ("dist_stop_docker.sh", ["hostfile"])):
        r = run(script, *hostfile, *args, cwd=proj)
        assert r.returncode == 2, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: experiment "), r.stderr


def test_trigger_refuses_a_master_port_another_trigger_claimed(proj):
    """The claim is a lock on the port's file, taken before the port check: here another trigger holds it (its
    job has not bound the port yet, so a bind test alone would pass)."""
    env = launcher_env()
    port = int(env["MASTER_PORT"])
    with open(ports.lock_path(port), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("other/2026120100/1764.42\n")
        f.flush()
        r = run("dist_trigger_docker.sh", "hostfile", "cfg.yaml", "aquila-tiny", "e", cwd=proj, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == (
        f"error: master port {port} on 127.0.0.1 is already taken by job other/2026120100/1764.42, started by "
        f"another trigger; set MASTER_PORT to a free port, or stop that job first (dist_stop_docker.sh <hostfile> "
        f"--job-id other/2026120100/1764.42)"
    )
    assert r.stdout == "" and not (proj / "checkpoints_out").exists()


@pytest.mark.slow
def test_two_triggers_at_once_only_one_gets_the_master_port(proj):
    env = launcher_env(STUB_SLEEP="300")
    port = env["MASTER_PORT"]
    cmd = ["bash", str(EXAMPLES / "dist_trigger_docker.sh"), "hostfile", "cfg.yaml", "aquila-tiny"]
    procs = [subprocess.Popen([*cmd, f"exp{i}"], cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]  # fmt: skip
    try:
        outs = [p.communicate(timeout=120) for p in procs]
        assert sorted(p.returncode for p in procs) == [0, 2], outs
        won = next(i for i, p in enumerate(procs) if p.returncode == 0)
        lost = 1 - won
        save_dir = save_dir_of(outs[won][0])
        job_id = jobs.job_id_for(save_dir)
        lines = outs[lost][1].strip().splitlines()
        assert len(lines) == 1, outs[lost]
        # claimed by the winner's trigger (its id written or not yet), or bound by the winner's torchrun already
        assert any(
            lines[0].startswith(f"error: master port {port} on 127.0.0.1 is {how}")
            for how in (f"already taken by job {job_id},", "being claimed by another trigger", "already in use")
        ), lines
        assert "started" not in outs[lost][0] and not (proj / "checkpoints_out" / f"exp{lost}").exists()
        wait_for(lambda: len(records(save_dir)) == 2, 120, "the winner's ranks to start")
    finally:
        for env_file in proj.glob("checkpoints_out/*/*/launch/job.env"):
            jobs.stop_job(jobs.read_env_file(env_file)["JOB_ID"], timeout=5)


def test_trigger_rejects_busy_master_port(proj):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("dist_trigger_docker.sh", "hostfile", "cfg.yaml", "aquila-tiny", "e", cwd=proj,
                env=launcher_env(MASTER_PORT=str(port)))  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"error: master port {port} on 127.0.0.1 is already in use (another job, or a stale one: see "
        f"local_stop_docker.sh); set MASTER_PORT to a free port"
    )
    assert not (proj / "checkpoints_out").exists()


def test_yaml_model_name_wins_and_is_checked(proj):
    (proj / "m.yaml").write_text("model_name: aquila-9b\nsave_dir: elsewhere\n")
    r = run("dist_trigger_docker.sh", "hostfile", "m.yaml", "aquila-tiny", "e", cwd=proj)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"warning: {proj}/m.yaml sets model_name: aquila-9b, which overrides 'aquila-tiny'",
        f"warning: {proj}/m.yaml sets save_dir: elsewhere, which overrides the launcher's",
        f"error: model_name 'aquila-9b': no {proj}/checkpoints_in/aquila-9b/config.json and no preset of that "
        f"name ({', '.join(sorted(PRESETS))})",
    ]


def test_trigger_usage_and_missing_script(proj):
    r = run("dist_trigger_docker.sh", "hostfile", "cfg.yaml", cwd=proj)
    assert r.returncode == 2 and "usage: dist_trigger_docker.sh [--follow] <hostfile>" in r.stderr
    r = run("dist_trigger_docker.sh", "hostfile", "cfg.yaml", "aquila-tiny", "e", cwd=proj,
            env=launcher_env(SCRIPT_FILE="nope.py"))  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip() == "error: SCRIPT_FILE 'nope.py': file not found"


def test_local_trigger_needs_exactly_one_local_node(proj):
    (proj / "two").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    r = run("local_trigger_docker.sh", "two", "cfg.yaml", "aquila-tiny", "e", cwd=proj)
    assert r.returncode == 2 and "needs exactly 1 node, found 2" in r.stderr
    (proj / "remote").write_text("10.255.255.1 slots=1\n")
    r = run("local_trigger_docker.sh", "remote", "cfg.yaml", "aquila-tiny", "e", cwd=proj)
    assert r.returncode == 2 and "10.255.255.1 is not this machine" in r.stderr
    assert not (proj / "checkpoints_out").exists()


def test_node_script_needs_rank_when_several_lines_are_this_machine(proj):
    (proj / "two").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    r = run("bmtrain_mgpu.sh", "two", "cfg.yaml", "aquila-tiny", "e", "v1", cwd=proj)
    assert r.returncode == 2
    assert "cannot tell which node this is (lines 1, 2 match this machine); pass the node rank" in r.stderr
    r = run("bmtrain_mgpu.sh", "two", "cfg.yaml", "aquila-tiny", "e", "v1", "2", cwd=proj)
    assert r.returncode == 2 and "node rank '2' must be an integer from 0 to 1" in r.stderr


def test_torchrun_missing_is_a_clear_error(proj):
    """A Python environment without torch: the node fails with a one-line error and --follow reports it."""
    fake = proj / "notorch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    py = proj / "bin" / "python"
    py.parent.mkdir()
    py.write_text(f'#!/bin/sh\nPYTHONPATH="{fake}:{REPO}" exec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    (proj / "one").write_text("127.0.0.1 slots=1\n")
    r = run("local_trigger_docker.sh", "--follow", "one", "cfg.yaml", "aquila-tiny", "e", cwd=proj,
            env=launcher_env(AQUILA_PYTHON=str(py)))  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "torchrun not found: " in r.stdout and "has no torch" in r.stdout
    assert "error: node 0 (127.0.0.1) failed (exit status 2)" in r.stderr


# --- remote nodes through a stand-in ssh ----------------------------------------------------------------------


@pytest.fixture
def fake_ssh(tmp_path: Path):
    """An ssh stand-in that records `<host> <command>` per call (one JSON line) and exits $FAKE_SSH_RC_<n>."""
    log = tmp_path / "ssh_calls.jsonl"
    script = tmp_path / "fake_ssh.py"
    script.write_text(
        "import json, os, sys\n"
        f"log = {str(log)!r}\n"
        "n = sum(1 for _ in open(log)) if os.path.exists(log) else 0\n"
        "open(log, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(int(os.environ.get(f'FAKE_SSH_RC_{n}', '0')))\n"
    )

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return f"{sys.executable} {script} -o BatchMode=yes", calls


def test_remote_nodes_are_started_over_ssh_with_their_rank(proj, fake_ssh):
    ssh, calls = fake_ssh
    (proj / "remote").write_text("10.255.255.1 slots=1\n# second node\n10.255.255.2 slots=2\n")
    env = launcher_env(AQUILA_SSH=ssh, NCCL_SOCKET_IFNAME="eth7")
    r = run("dist_trigger_docker.sh", "remote", "cfg.yaml", "aquila-tiny", "exp", cwd=proj, env=env)
    assert r.returncode == 0, r.stderr
    assert "NODES_NUM: 2" in r.stdout
    save_dir = save_dir_of(r.stdout)
    assert save_dir.parent == proj / "checkpoints_out" / "exp"
    job = jobs.read_env_file(save_dir / "launch" / "job.env")
    checks, made = calls()[:2], calls()[2:]
    for rank, call in enumerate(checks):  # before starting anything: the project, Python and address are there
        assert call[:3] == ["-o", "BatchMode=yes", f"10.255.255.{rank + 1}"]
        assert shlex.split(call[3])[:2] == ["cd", str(proj)]
        words = shlex.split(call[3])
        i = words.index("check-node")
        assert words[i + 1 : i + 5] == ["--hostfile", str(proj / "remote"), "--rank", str(rank)]
    assert [c[:3] for c in made] == [["-o", "BatchMode=yes", "10.255.255.1"], ["-o", "BatchMode=yes", "10.255.255.2"]]
    for rank, call in enumerate(made):
        assert len(call) == 4
        words = shlex.split(call[3])
        assert words[:5] == ["cd", str(proj), "||", "exit", "1;"]
        assert words[5] == "env"
        assert f"AQUILA_JOB_ID={job['JOB_ID']}" in words and f"MASTER_PORT={env['MASTER_PORT']}" in words
        assert f"SCRIPT_FILE={STUB}" in words and f"AQUILA_PYTHON={sys.executable}" in words
        assert "NCCL_SOCKET_IFNAME=eth7" in words
        i = words.index("setsid")
        assert words[i + 1 : i + 3] == ["bash", str(EXAMPLES / "bmtrain_mgpu.sh")]
        assert words[i + 3 : i + 9] == [str(proj / "remote"), str(proj / "cfg.yaml"), "aquila-tiny", "exp",
                                        save_dir.name, str(rank)]  # fmt: skip
        log = job["LOGFILE"] if rank == 0 else str(save_dir / "launch" / f"node{rank}.log.txt")
        assert words[-4:] == [f">{log}", "2>&1", "</dev/null", "&"]

    # dist_stop reaches the same hosts with this job's id (default: the latest job).
    r = run("dist_stop_docker.sh", "remote", cwd=proj, env=env)
    assert r.returncode == 0, r.stderr
    stops = sorted(calls()[4:], key=lambda c: c[2])  # both nodes at once, in any order
    assert [c[2] for c in stops] == ["10.255.255.1", "10.255.255.2"]
    assert shlex.split(stops[0][3])[-3:] == [str(EXAMPLES / "local_stop_docker.sh"), "--job-id", job["JOB_ID"]]


def test_failed_ssh_start_is_reported_and_started_nodes_stopped(proj, fake_ssh):
    ssh, calls = fake_ssh
    (proj / "remote").write_text("10.255.255.1 slots=1\n10.255.255.2 slots=1\n")
    r = run("dist_trigger_docker.sh", "remote", "cfg.yaml", "aquila-tiny", "exp", cwd=proj,
            env=launcher_env(AQUILA_SSH=ssh, FAKE_SSH_RC_3="255"))  # fmt: skip
    assert r.returncode == 1
    assert "node 1 (10.255.255.2) could not be started; stopping the nodes already started" in r.stderr
    hosts = [c[2] for c in calls()]
    assert hosts[:4] == ["10.255.255.1", "10.255.255.2"] * 2  # check, start
    assert sorted(hosts[4:]) == ["10.255.255.1", "10.255.255.2"]  # stop, both nodes at once
    assert all("local_stop_docker.sh" in c[3] for c in calls()[4:])


# --- real processes with the stand-in training script --------------------------------------------------------


@pytest.mark.slow
def test_single_node_two_processes(proj):
    r = run("dist_trigger_docker.sh", "--follow", "hostfile", "cfg.yaml", "aquila-tiny", "exp", cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NODES_NUM: 1" in r.stdout
    save_dir = save_dir_of(r.stdout)
    assert len(save_dir.name) == 10 and save_dir.name.isdigit()  # YYYYMMDDHH
    recs = records(save_dir)
    assert [(x["rank"], x["world_size"], x["node_rank"], x["sum"]) for x in recs] == [(0, 2, 0, 3.0), (1, 2, 0, 3.0)]
    a = recs[0]["args"]
    assert a["not_call_launch"] and a["save_dir"] == str(save_dir) and a["yaml_config"] == str(proj / "cfg.yaml")
    assert a["pre_load_dir"] == str(proj / "checkpoints_in") and a["model_name"] == "aquila-tiny"
    assert a["experiment_name"] == "exp" and a["wandb_dir"] == str(proj / "wandb" / "exp" / save_dir.name)
    assert (a["adam_beta1"], a["adam_beta2"], a["weight_decay"]) == (0.9, 0.95, 0.1)
    assert recs[0]["job_id"].startswith(f"exp/{save_dir.name}/")
    assert (save_dir / "cfg.yaml").read_text() == "batch_size: 2\n"
    assert (save_dir / "hostfile").is_file()
    assert "stub: rank 0 of 2 sum 3.0" in r.stdout  # --follow streamed the log
    assert (save_dir / "launch" / "node0.exit").read_text().strip() == "0"


def test_yaml_override_warning_is_printed_once_per_launch(proj):
    (proj / "w.yaml").write_text(f"batch_size: 2\npre_load_dir: {proj / 'checkpoints_in'}\n")
    r = run("dist_trigger_docker.sh", "--follow", "hostfile", "w.yaml", "aquila-tiny", "exp", cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("sets pre_load_dir") == 1
    save_dir = save_dir_of(r.stdout)
    node = run("bmtrain_mgpu.sh", "hostfile", "w.yaml", "aquila-tiny", "exp", "by-hand", "0", cwd=proj)
    assert node.returncode == 0, node.stdout + node.stderr
    assert node.stderr.count("sets pre_load_dir") == 1  # started by hand: its own check warns
    assert save_dir.is_dir()


@pytest.mark.slow
def test_two_local_nodes_rendezvous(proj):
    (proj / "two").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    r = run("dist_trigger_docker.sh", "--follow", "two", "cfg.yaml", "aquila-tiny", "exp", cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = records(save_dir_of(r.stdout))
    assert [(x["rank"], x["world_size"], x["node_rank"], x["local_rank"], x["sum"]) for x in recs] == [
        (0, 2, 0, 0, 3.0),
        (1, 2, 1, 0, 3.0),
    ]


@pytest.mark.slow
def test_follow_fails_when_a_node_fails_and_stops_the_rest(proj):
    (proj / "two").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    env = launcher_env(STUB_FAIL_RANK="1", AQUILA_FOLLOW="1")
    t0 = time.monotonic()
    r = run("dist_trigger_docker.sh", "two", "cfg.yaml", "aquila-tiny", "exp", cwd=proj, env=env)
    assert r.returncode != 0
    assert "error: node 1 (127.0.0.2) rank 1 (local_rank 0, exitcode 3) failed (exit status 1)" in r.stderr
    assert "node 1 log: error: stub rank 1 failing on purpose" in r.stderr  # the node's own first error line
    assert time.monotonic() - t0 < 100
    job_id = jobs.job_id_for(save_dir_of(r.stdout))
    wait_for(lambda: not jobs.job_processes(job_id), 30, "node 0 to be stopped")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["local_stop", "dist_stop"])
def test_stop_ends_only_this_job(proj, how):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        hostfile = "hostfile" if how == "local_stop" else "two"
        (proj / "two").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
        r = run("dist_trigger_docker.sh", hostfile, "cfg.yaml", "aquila-tiny", "exp", cwd=proj,
                env=launcher_env(STUB_SLEEP="300"))  # fmt: skip
        assert r.returncode == 0, r.stderr
        save_dir = save_dir_of(r.stdout)
        wait_for(lambda: len(records(save_dir)) == 2, 120, "both ranks to start")
        job_id = jobs.job_id_for(save_dir)
        before = jobs.job_processes(job_id)
        assert {x["pid"] for x in records(save_dir)} <= set(before)
        again = run("dist_trigger_docker.sh", hostfile, "cfg.yaml", "aquila-tiny", "exp", cwd=proj)
        if again.returncode == 0:  # the hour changed between the triggers: a new save dir, so it may start
            assert save_dir_of(again.stdout) != save_dir
        else:
            assert again.returncode == 2 and f"already has a running job ({job_id})" in again.stderr
        other_id = None
        if how == "local_stop":
            # A second job of another experiment, started later (so it is the latest), must survive too.
            (proj / "one").write_text("127.0.0.1 slots=1\n")
            r = run("dist_trigger_docker.sh", "one", "cfg.yaml", "aquila-tiny", "other", cwd=proj,
                    env=launcher_env(STUB_SLEEP="300"))  # fmt: skip
            assert r.returncode == 0, r.stderr
            other_dir = save_dir_of(r.stdout)
            wait_for(lambda: len(records(other_dir)) == 1, 120, "the other job to start")
            other_id = jobs.job_id_for(other_dir)
            r = run("local_stop_docker.sh", "exp", cwd=proj)
        else:
            r = run("dist_stop_docker.sh", "two", cwd=proj)
        assert r.returncode == 0, r.stderr
        assert f"stopped job {job_id} ({len(before)} processes" in r.stdout
        wait_for(lambda: not jobs.job_processes(job_id), 20, "the job to end")
        assert (save_dir / "launch" / "node0.exit").read_text().strip() == "143"
        assert bystander.poll() is None  # the unrelated python process survives
        if other_id is not None:
            assert jobs.job_processes(other_id)  # and so does the other job, until it is stopped by name
            r = run("local_stop_docker.sh", cwd=proj)
            assert r.returncode == 0 and f"stopped job {other_id}" in r.stdout
        r = run("local_stop_docker.sh", "exp", cwd=proj)
        assert r.returncode == 0 and f"no running process of job {job_id}" in r.stdout
    finally:
        bystander.kill()
        bystander.wait()
        for env_file in proj.glob("checkpoints_out/*/*/launch/job.env"):  # never leave a sleeping job behind
            jobs.stop_job(jobs.read_env_file(env_file)["JOB_ID"], timeout=5)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["dist_stop", "preemption", "preemption_of_all"])
def test_a_stop_with_a_checkpoint_is_reported_as_a_stop(proj, how):
    """The stub acts as the trainer does on SIGTERM (rank 0 logs the step and checkpoint, every rank exits 75),
    whether the stop scripts send it, a preemption signals the training processes only, or every process of the
    job (torchrun too, which then exits with its own SignalException)."""
    env = launcher_env(STUB_SLEEP="300", STUB_STOP_STEP="7")
    follow = subprocess.Popen(
        ["bash", str(EXAMPLES / "dist_trigger_docker.sh"), "--follow", "hostfile", "cfg.yaml", "aquila-tiny", "exp"],
        cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(list(proj.glob("checkpoints_out/exp/*/stub/rank*.json"))) == 2, 120, "both ranks")
        save_dir = next(proj.glob("checkpoints_out/exp/*/stub")).parent
        job_id = jobs.job_id_for(save_dir)
        stop = None
        if how == "dist_stop":
            stop = run("dist_stop_docker.sh", "hostfile", cwd=proj, env=env)
        else:
            pids = [rec["pid"] for rec in records(save_dir)]
            for pid in jobs.job_processes(job_id) if how == "preemption_of_all" else pids:
                os.kill(pid, signal.SIGTERM)
        out, err = follow.communicate(timeout=90)
    finally:
        follow.kill()
        for env_file in proj.glob("checkpoints_out/*/*/launch/job.env"):
            jobs.stop_job(jobs.read_env_file(env_file)["JOB_ID"], timeout=5)
    by = (
        "by the stop scripts (SIGTERM)" if how == "dist_stop" else "by SIGTERM to its training processes (a preemption)"
    )
    report = (
        f"stopped: job {job_id} was stopped {by} at iteration 7; checkpoint {save_dir}/7 saved; run the same command "
        f"to resume: bash dist_trigger_docker.sh hostfile cfg.yaml aquila-tiny exp (from {proj})"
    )
    assert follow.returncode == 75, out + err
    assert err.strip().splitlines() == [report], err
    log = (save_dir / "cfg.yaml.log.txt").read_text()
    if how != "preemption_of_all":  # (a signalled torchrun logs its own SignalException traceback)
        assert "ChildFailedError" not in log and "FAILED" not in log, log
    label = "stop" if stop else "preemption"
    last = f"node 0: the training processes stopped on SIGTERM ({label}) after saving a checkpoint; run the same "
    assert log.strip().splitlines()[-1].endswith(last + "command to resume"), log
    assert (save_dir / "launch" / "node0.exit").read_text().strip() == "75"
    if stop is not None:  # dist_stop says the same, from the machine that ran node 0
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert f"{socket.gethostname()}: {report}" in stop.stdout.splitlines(), stop.stdout


# --- interface binding, failure reports ---------------------------------------------------------------------------

IP_ADDR = """1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
1: lo    inet6 ::1/128 scope host \\       valid_lft forever preferred_lft forever
2: eth0@if7    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\\       valid_lft forever preferred_lft forever
2: eth0@if7    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever
3: ib0    inet 192.168.1.5/24 scope global ib0\\       valid_lft forever preferred_lft forever
"""


def test_node_interface_is_the_one_holding_the_hostfile_address(tmp_path):
    from aquila.launch.interfaces import node_interface

    def pick(address: str, multi_host: bool = True) -> str:
        return node_interface("hf", hf.Node(rank=1, address=address, slots=1, line=2), multi_host, IP_ADDR)

    assert pick("10.0.0.5") == "eth0" and pick("192.168.1.5") == "ib0"
    assert pick("127.0.0.2", multi_host=False) == "lo"
    with pytest.raises(AquilaError, match=r"^hostfile hf line 2: node 1 address 10.9.9.9 is on no network interface "
                       r"of .* \(it has 10.0.0.5 \(eth0\), 192.168.1.5 \(ib0\)\); put an address of this node"):  # fmt: skip
        pick("10.9.9.9")
    with pytest.raises(AquilaError, match="is loopback on .*, which the other hosts cannot reach"):
        pick("127.0.0.1")
    # a name that does not resolve here (an ssh alias) or only to loopback: no binding, a warning
    assert pick("no-such-host.invalid") == "" and pick("localhost", multi_host=False) == "lo"
    assert pick("localhost") == ""


TORCHRUN_REPORT = """Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_01:05:50
  host      : node1
  rank      : 3 (local_rank: 1)
  exitcode  : {code} (pid: 897){sig}
  error_file: <N/A>
"""


def test_failure_report_prefers_the_rank_killed_by_a_signal():
    killed = TORCHRUN_REPORT.format(code=-9, sig="  (SIGKILL)")
    peer = "[rank0]: RuntimeError: Connection reset by peer\n" + TORCHRUN_REPORT.format(code=1, sig=" ")
    assert jobs.failed_rank(killed) == (3, 1, -9, "SIGKILL") and jobs.failed_rank(peer) == (3, 1, 1, "")
    assert jobs.failed_rank("no report") is None
    # node 0 recorded its failure first, but node 1's rank was killed: node 1 is the one to name
    assert jobs._culprit({0: 1, 1: 1}, {0: peer, 1: killed}, {0: 1.0, 1: 2.0}) == 1
    assert jobs._culprit({0: 1, 1: 1}, {0: peer, 1: peer}, {0: 2.0, 1: 1.0}) == 1  # else the first on record
    assert jobs.first_error_line("x\n[rank1]: error: bad data at line 3\nerror: later\n") == "error: bad data at line 3"


def test_follow_names_a_master_port_taken_after_the_check(tmp_path, capsys):
    """The port claim covers triggers; anything else that binds the port before torchrun does is named as such."""
    save_dir = tmp_path / "exp" / "v"
    log = save_dir / "cfg.yaml.log.txt"
    jobs.start_job(save_dir, tmp_path, "exp/v/1.2", {"NODES_NUM": "1", "LOGFILE": str(log)})
    log.write_text(
        "torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address. "
        "port: 23456, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use\n"
    )
    (save_dir / "launch" / "node0.exit").write_text("1\n")
    assert jobs.follow(save_dir, log, settle=0) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: node 0 failed (exit status 1)")
    assert err[1] == (
        "node 0 log: torchrun could not bind the master port 23456 (EADDRINUSE): another process took it after "
        "the launcher's check; set MASTER_PORT to a free port"
    )


@pytest.mark.slow
def test_lost_rank_on_one_node_ends_the_other_and_is_named(proj):
    env = launcher_env(STUB_LOOP="1")
    follow = subprocess.Popen(
        ["bash", str(EXAMPLES / "dist_trigger_docker.sh"), "--follow", "hostfile", "cfg.yaml", "aquila-tiny", "exp"],
        cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(list(proj.glob("checkpoints_out/exp/*/stub/rank*.json"))) == 2, 120, "both ranks")
        save_dir = next(proj.glob("checkpoints_out/exp/*/stub")).parent
        rank1 = next(x for x in records(save_dir) if x["rank"] == 1)
        os.kill(rank1["pid"], 9)
        t0 = time.monotonic()
        _, err = follow.communicate(timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        follow.kill()
    assert follow.returncode != 0
    assert "error: node 0 (127.0.0.1) rank 1 (local_rank 1, exitcode -9 SIGKILL) failed" in err, err
    wait_for(lambda: not jobs.job_processes(jobs.job_id_for(save_dir)), 20, "rank 0 to end")
