"""The launcher across two real nodes on one machine (tests/netns_cluster.py): node0 starts itself and node1 over
ssh, exactly as between two servers. Each node has two NICs; the hostfile's address decides which one carries the
collectives. Stand-in training script first (fast), then the real aquila-tiny pretraining, SFT and resume."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from aquila.launch import jobs
from tests.netns_cluster import ADDRS, NetnsCluster, start_cluster
from tests.test_launcher import EXAMPLES, launcher_env, records, save_dir_of, wait_for
from tests.test_launcher_train import REPO, real_env, tiny_yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from start_cluster(tmp_path_factory.mktemp("cluster"))


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    (tmp_path / "cfg.yaml").write_text("batch_size: 2\n")
    return tmp_path


def hostfile(proj: Path, link: int = 0, name: str = "hostfile") -> str:
    (proj / name).write_text(f"{ADDRS['node0'][link]} slots=1\n{ADDRS['node1'][link]} slots=1\n")
    return name


def trigger(cluster: NetnsCluster, proj: Path, *args: str, env: dict, timeout: float = 180):
    env = {**env, "AQUILA_EXPORT_ENV": " ".join(k for k in env if k.startswith("STUB_"))}  # to node1 too
    return cluster.run("node0", "bash", str(EXAMPLES / "dist_trigger_docker.sh"), *args, cwd=proj, env=env,
                       timeout=timeout)  # fmt: skip


def host_pid(ns_pid: int, job_id: str) -> int:
    """The pid, as this (root) namespace sees it, of the job's process that is `ns_pid` inside its node."""
    for pid in jobs.job_processes(job_id):
        status = Path(f"/proc/{pid}/status").read_text()
        nspids = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
        if int(nspids[-1]) == ns_pid:
            return pid
    raise AssertionError(f"no process {ns_pid} of job {job_id}")


# --- the stand-in training script -------------------------------------------------------------------------------


@pytest.mark.parametrize("link,user_ifname", [(1, None), (0, "eth1")])  # (0, None): the real pretraining test
def test_two_nodes_over_ssh_bind_the_hostfile_interface(cluster, proj, link, user_ifname):
    extra = {"GLOO_SOCKET_IFNAME": user_ifname} if user_ifname else {}
    r = trigger(cluster, proj, "--follow", hostfile(proj, link), "cfg.yaml", "aquila-tiny", "exp",
                env=launcher_env(AQUILA_SSH=cluster.ssh, **extra))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NODES_NUM: 2" in r.stdout
    save_dir = save_dir_of(r.stdout)
    ifname = user_ifname or f"eth{link}"
    got = [(x["rank"], x["world_size"], x["node_rank"], x["host"], x["gloo_socket_ifname"], x["sum"])
           for x in records(save_dir)]  # fmt: skip
    assert got == [(0, 2, 0, "node0", ifname, 3.0), (1, 2, 1, "node1", ifname, 3.0)]
    node1_log = (save_dir / "launch" / "node1.log.txt").read_text()
    assert f"node1 node 1/2, 1 processes, master {ADDRS['node0'][link]}:" in node1_log
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 1" in node1_log


def test_address_on_no_interface_of_its_node_is_refused_before_anything_starts(cluster, proj):
    # node1 answers for 10.211.2.2 (a local route, as for a NAT or floating address) but no NIC of it holds it.
    cluster.ip("node1", "route", "add", "local", "10.211.2.2/32", "dev", "lo", "table", "local")
    cluster.ip("node0", "route", "add", "10.211.2.2/32", "via", ADDRS["node1"][0])
    known = cluster.state / "known_hosts"
    saved = known.read_text()
    node1_key = " ".join((cluster.state / "node1" / "host_key.pub").read_text().split()[:2])
    known.write_text(saved + f"10.211.2.2 {node1_key}\n")
    try:
        (proj / "hostfile").write_text(f"{ADDRS['node0'][0]} slots=1\n10.211.2.2 slots=1\n")
        r = trigger(cluster, proj, "hostfile", "cfg.yaml", "aquila-tiny", "exp",
                    env=launcher_env(AQUILA_SSH=cluster.ssh))  # fmt: skip
    finally:
        known.write_text(saved)
        cluster.ip("node0", "route", "del", "10.211.2.2/32")
        cluster.ip("node1", "route", "del", "local", "10.211.2.2/32", "dev", "lo", "table", "local")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"error: dist_trigger_docker.sh: node 1 (10.211.2.2): hostfile {proj}/hostfile line 2: node 1 address "
        f"10.211.2.2 is on no network interface of node1 (it has {ADDRS['node1'][0]} (eth0), {ADDRS['node1'][1]} "
        f"(eth1)); put an address of this node in the hostfile"
    ]
    assert not (proj / "checkpoints_out").exists()


def test_unreachable_node_fails_within_seconds(cluster, proj):
    t0 = time.monotonic()
    no_sshd = cluster.ssh + " -p 2222"  # nothing listens there: a stopped sshd
    r = trigger(cluster, proj, "--follow", hostfile(proj), "cfg.yaml", "aquila-tiny", "exp",
                env=launcher_env(AQUILA_SSH=no_sshd))  # fmt: skip
    assert time.monotonic() - t0 < 20
    assert r.returncode == 2
    [line] = r.stderr.splitlines()
    assert line.startswith(f"error: dist_trigger_docker.sh: node 1 ({ADDRS['node1'][0]}): cannot connect with 'ssh ")
    assert "Connection refused" in line
    assert not (proj / "checkpoints_out").exists()


def test_node_without_the_project_fails_within_seconds(cluster, tmp_path):
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "cfg.yaml").write_text("batch_size: 2\n")
    # On node1 only, an empty filesystem hides the project (node1 has its own mount table).
    cluster.run("node1", "mount", "-t", "tmpfs", "none", str(tmp_path), cwd=REPO, env=dict(os.environ))
    try:
        assert cluster.run("node1", "ls", str(proj), cwd=REPO, env=dict(os.environ)).returncode != 0
        t0 = time.monotonic()
        r = trigger(cluster, proj, "--follow", hostfile(proj), "cfg.yaml", "aquila-tiny", "exp",
                    env=launcher_env(AQUILA_SSH=cluster.ssh))  # fmt: skip
    finally:
        cluster.run("node1", "umount", str(tmp_path), cwd=REPO, env=dict(os.environ))
    assert time.monotonic() - t0 < 20
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"error: dist_trigger_docker.sh: node 1 ({ADDRS['node1'][0]}): the project directory {proj} is not there "
        f"(it must be the same path on every node)"
    ]


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_dist_stop_stops_both_nodes_sigterm_first_and_nothing_else(cluster, proj, ignores_sigterm):
    env = launcher_env(AQUILA_SSH=cluster.ssh, STUB_SLEEP="300", AQUILA_STOP_TIMEOUT="3" if ignores_sigterm else "60",
                       **({"STUB_IGNORE_TERM": "1"} if ignores_sigterm else {}))  # fmt: skip
    bystander = cluster.popen("node1", "sleep", "300", cwd=proj, env=env)  # same node, same environment, no job
    try:
        r = trigger(cluster, proj, hostfile(proj), "cfg.yaml", "aquila-tiny", "exp", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        save_dir = save_dir_of(r.stdout)
        wait_for(lambda: len(records(save_dir)) == 2, 120, "both ranks to start")
        job_id = jobs.job_id_for(save_dir)
        r = cluster.run("node0", "bash", str(EXAMPLES / "dist_stop_docker.sh"), "hostfile", "exp", cwd=proj, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"node0: stopped job {job_id}" in r.stdout and f"node1: stopped job {job_id}" in r.stdout
        assert not jobs.job_processes(job_id)  # on either node (this namespace sees both)
        terms = sorted(p.name for p in (save_dir / "stub").glob("term*"))
        killed = [line.split(":")[0] for line in r.stdout.splitlines() if "outlived SIGTERM by 3 s" in line]
        if ignores_sigterm:  # killed only after the timeout, on each node
            assert terms == [] and killed == ["node0", "node1"]
        else:  # the graceful signal came first and sufficed
            assert terms == ["term0", "term1"] and "SIGKILL" not in r.stdout
            logs = (save_dir / "cfg.yaml.log.txt").read_text() + (save_dir / "launch" / "node1.log.txt").read_text()
            assert "got signal: 15" not in logs  # torchrun was left alone (it would SIGKILL a saving worker)
            exits = [save_dir / "launch" / f"node{rank}.exit" for rank in (0, 1)]
            # A node script's EXIT trap writes its status as it ends; on a loaded machine that can trail the stop.
            try:
                wait_for(lambda: all(p.is_file() for p in exits), 30, "both node scripts to record their exit status")
            except AssertionError as e:  # (seen once in a full run, never alone: say what the nodes left behind)
                left = sorted(p.name for p in (save_dir / "launch").iterdir())
                now = (save_dir / "cfg.yaml.log.txt").read_text() + (save_dir / "launch" / "node1.log.txt").read_text()
                tails = "\n".join(now.splitlines()[-30:])
                raise AssertionError(
                    f"{e}; launch/ has {left}; stop printed {r.stdout!r}; logs end:\n{tails}"
                ) from None
            assert [p.read_text().strip() for p in exits] == ["143", "143"]
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# --- the real training scripts --------------------------------------------------------------------------------

STEPS = 8


def pretrain_yaml(proj: Path, **overrides) -> str:
    return tiny_yaml(proj, "Aquila-pretrain-tiny.yaml", max_steps=STEPS, save_interval=2, batch_size=2,
                     eval_interval=1000, num_checkpoints=10,
                     data_prefix=str(REPO / "examples" / "indexed_dataset" / "data" / "demo_text_document"),
                     **overrides)  # fmt: skip


def train_env(cluster: NetnsCluster) -> dict[str, str]:
    # One thread per process everywhere: a node's default (its CPUs / its slots) differs between 1 and 2 processes
    # per node, and a different thread count sums matmuls in a different order (last-digit loss differences).
    return real_env() | {"AQUILA_SSH": cluster.ssh, "OMP_NUM_THREADS": "1"}


def trainers(job_id: str, group_rank: int | None = None) -> list[int]:
    """The job's training processes (the python under torchrun), on every node or on node `group_rank`."""
    marker = f"GROUP_RANK={group_rank}\0".encode()
    found = []
    for p in jobs.job_processes(job_id):
        try:  # a process listed a moment ago may have ended since (e.g. a launcher helper)
            cmd, environ = Path(f"/proc/{p}/cmdline").read_text(), Path(f"/proc/{p}/environ").read_bytes()
        except OSError:
            continue
        if "aquila_pretrain.py" in cmd and "torchrun" not in cmd and (group_rank is None or marker in environ):
            found.append(p)
    return found


def sigterm_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    pending = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("ShdPnd:", "SigPnd:"))]
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in pending)


def losses(save_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and r.get("kind", "train") == "train"}


@pytest.fixture(scope="module")
def two_node_pretrain(cluster, tmp_path_factory):
    """aquila-tiny pretrained for STEPS steps on node0 + node1 (1 process each), from node0."""
    proj = tmp_path_factory.mktemp("pretrain")
    cfg = pretrain_yaml(proj)
    r = trigger(cluster, proj, "--follow", hostfile(proj), cfg, "aquila-tiny", "demo",
                env=train_env(cluster), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return proj, cfg, r.stdout, save_dir_of(r.stdout)


def test_pretrain_on_two_nodes_equals_two_processes_on_one(cluster, two_node_pretrain, tmp_path):
    proj, cfg, out, save_dir = two_node_pretrain
    assert "NODES_NUM: 2" in out and "node 1: 10.211.0.2 slots=1 started" in out
    assert "--nnodes 2 --node_rank 0 --nproc_per_node 1" in out
    node1_log = (save_dir / "launch" / "node1.log.txt").read_text()
    assert "node1 node 1/2, 1 processes, master 10.211.0.1:" in node1_log and "GLOO_SOCKET_IFNAME=eth0" in node1_log
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 1" in node1_log
    assert (save_dir / "latest_iteration.txt").read_text().split()[0] == str(STEPS)
    assert (save_dir / str(STEPS) / "pytorch_model.bin").is_file()  # the weights, written once (FlagAI's file)

    (tmp_path / "hostfile").write_text("127.0.0.1 slots=2\n")
    pretrain_yaml(tmp_path)
    r = cluster.run("node0", "bash", str(EXAMPLES / "local_trigger_docker.sh"), "--follow", "hostfile", cfg,
                    "aquila-tiny", "demo", cwd=tmp_path, env=train_env(cluster), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    one_node = losses(save_dir_of(r.stdout))
    assert sorted(one_node) == list(range(1, STEPS + 1))
    assert losses(save_dir) == one_node


def test_sft_on_two_nodes_from_the_pretrained_checkpoint(cluster, two_node_pretrain):
    proj, _, _, save_dir = two_node_pretrain
    cfg = tiny_yaml(proj, "Aquila-sft-tiny.yaml", enable_sft_dataset_dir=str(EXAMPLES / "data"), max_steps=2,
                    pre_load_dir=str(save_dir), model_name=str(STEPS), bmt_pre_load=True, tokenizer_dir=None)  # fmt: skip
    r = trigger(cluster, proj, "--follow", hostfile(proj), cfg, str(STEPS), "chat",
                env=train_env(cluster), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    sft_dir = save_dir_of(r.stdout)
    assert "aquila_sft.py --not_call_launch" in r.stdout and "NODES_NUM: 2" in r.stdout
    assert str(save_dir / str(STEPS)) in r.stdout  # the log names the weights it loaded
    assert (sft_dir / "latest_iteration.txt").read_text().split()[0] == "2"
    assert (sft_dir / "2" / "pytorch_model.bin").is_file()


def test_lost_rank_then_resume_on_two_nodes_gives_the_uninterrupted_losses(cluster, two_node_pretrain, tmp_path):
    _, _, _, reference = two_node_pretrain
    cfg = pretrain_yaml(tmp_path)
    hostfile(tmp_path)
    env = train_env(cluster)
    follow = cluster.popen("node0", "bash", str(EXAMPLES / "dist_trigger_docker.sh"), "--follow", "hostfile", cfg,
                           "aquila-tiny", "demo", cwd=tmp_path, env=env)  # fmt: skip
    try:
        wait_for(lambda: any(tmp_path.glob("checkpoints_out/demo/*/launch/job.env")), 60, "the job to start")
        save_dir = next(tmp_path.glob("checkpoints_out/demo/*/launch/job.env")).parents[1]
        job_id = jobs.job_id_for(save_dir)

        wait_for(lambda: len(trainers(job_id, group_rank=1)) == 1, 120, "node1's training process")
        [worker] = trainers(job_id, group_rank=1)
        tracker = save_dir / "latest_iteration.txt"
        deadline = time.monotonic() + 240
        while not tracker.exists() and time.monotonic() < deadline:  # kill right after the first checkpoint
            time.sleep(0.02)
        os.kill(worker, signal.SIGKILL)  # as a crash or the OOM killer would
        t0 = time.monotonic()
        out, err = follow.communicate(timeout=120)
        assert time.monotonic() - t0 < 60
    finally:
        follow.kill()
    assert follow.returncode != 0
    assert f"error: node 1 ({ADDRS['node1'][0]}) rank 1 (local_rank 0, exitcode -9 SIGKILL) failed" in err, err
    wait_for(lambda: not jobs.job_processes(job_id), 30, "node0's side to end")
    done = int(tracker.read_text().split()[0])
    assert done < STEPS, "the job finished before the kill; nothing was tested"

    # The same command again resumes from the last complete checkpoint on both nodes (load_dir: auto) ...
    follow = cluster.popen("node0", "bash", str(EXAMPLES / "dist_trigger_docker.sh"), "--follow", "hostfile", cfg,
                           "aquila-tiny", "demo", cwd=tmp_path, env=env)  # fmt: skip
    try:
        first_job = job_id
        wait_for(lambda: jobs.job_id_for(jobs.find_save_dir(tmp_path, "demo", None)) != first_job, 60, "the rerun")
        save_dir = jobs.find_save_dir(tmp_path, "demo", None)  # the same one unless the hour changed meanwhile
        job_id = jobs.job_id_for(save_dir)
        wait_for(lambda: len(trainers(job_id)) == 2, 120, "both training processes")
        both = trainers(job_id)
        tracker = save_dir / "latest_iteration.txt"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not tracker.exists() or int(tracker.read_text().split()[0]) <= done):
            time.sleep(0.02)
        # ... and is stopped gracefully by dist_stop_docker.sh: both trainers are frozen so that its SIGTERM
        # arrives before the run can finish, then let go; they stop at the same step and write a checkpoint.
        for pid in both:
            os.kill(pid, signal.SIGSTOP)
        stop = cluster.popen("node0", "bash", str(EXAMPLES / "dist_stop_docker.sh"), "hostfile", "demo", cwd=tmp_path,
                             env=env | {"AQUILA_STOP_TIMEOUT": "120"})  # fmt: skip
        wait_for(lambda: all(sigterm_pending(pid) for pid in both), 60, "dist_stop's SIGTERM to both trainers")
        for pid in both:
            os.kill(pid, signal.SIGCONT)
        stop_out, stop_err = stop.communicate(timeout=180)
        out, err = follow.communicate(timeout=120)
    finally:
        follow.kill()
    assert stop.returncode == 0, stop_out + stop_err
    assert "node0: stopped job" in stop_out and "node1: stopped job" in stop_out and "SIGKILL" not in stop_out
    stopped_at = int(tracker.read_text().split()[0])
    assert done < stopped_at < STEPS
    assert f"SIGTERM: stopping at iteration {stopped_at} and saving a checkpoint" in out
    assert f"stopped by SIGTERM at iteration {stopped_at}: checkpoint {save_dir}/{stopped_at}; exit status 75" in out
    # a stop, reported as one (not torchrun's ChildFailedError and an `error:` line), with the step both nodes saved
    report = (
        f"stopped: job {job_id} was stopped by the stop scripts (SIGTERM) at iteration {stopped_at}; checkpoint "
        f"{save_dir}/{stopped_at} saved; run the same command to resume: bash dist_trigger_docker.sh hostfile "
    )
    assert err.strip().splitlines()[-1].startswith(report), err
    assert "error:" not in err and "ChildFailedError" not in out
    assert "ChildFailedError" not in (save_dir / "launch" / "node1.log.txt").read_text()
    assert [(save_dir / "launch" / f"node{r}.exit").read_text().strip() for r in (0, 1)] == ["75", "75"]

    # ... and the same command once more finishes; every loss after the kill equals the uninterrupted run's.
    r = trigger(cluster, tmp_path, "--follow", "hostfile", cfg, "aquila-tiny", "demo", env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"load_dir auto: resuming from {save_dir}/{stopped_at}" in r.stdout
    # Runs crossing an hour get a new save dir (FlagAI's EXP_VERSION is the hour): merge this experiment's dirs.
    resumed = {}
    for run_dir in sorted(save_dir_of(r.stdout).parent.iterdir()):
        if (run_dir / "metrics.jsonl").exists():
            resumed |= losses(run_dir)
    uninterrupted = losses(reference)
    assert {s: resumed[s] for s in range(done + 1, STEPS + 1)} == {
        s: uninterrupted[s] for s in range(done + 1, STEPS + 1)
    }
