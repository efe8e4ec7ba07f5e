"""One launched job: its record files, finding exactly its processes, stopping them, following its log.

Every process of a job carries `AQUILA_JOB_ID=<id>` in its environment (the launchers set it for each node's
bmtrain_mgpu.sh; torchrun and the workers inherit it), so a stop ends that job and nothing else, even after
PIDs are reused. Record files live in `<save_dir>/launch/`:

- `job.env`          JOB_ID, HOSTFILE, CONFIG, MODEL_NAME, NODES_NUM, LOGFILE (written by the trigger)
- `node<r>.pid`      `pid=<p> pgid=<g> host=<hostname> job=<id>` of node r's bmtrain_mgpu.sh
- `node<r>.exit`     that script's exit status, written when it ends: 0 finished, 75 stopped on SIGTERM after
                     saving a checkpoint, 143 stopped (SIGTERM) before that, anything else failed
- `node<r>.stopped`  `by=stop` (the stop scripts) or `by=preemption` (SIGTERM to the training processes only),
                     when the node exited 75

and `<proj_home>/checkpoints_out/latest_job.txt` holds the save dir of the most recent trigger.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

from aquila.errors import AquilaError
from aquila.io_utils import write_text_atomic
from aquila.launch.hostfile import parse_hostfile

LATEST = "latest_job.txt"
STOPPED = 75  # every training process of the node saved a checkpoint on SIGTERM and stopped (the trainer's status)
TERMINATED = 143  # the node script got SIGTERM before its training processes had stopped that way


def launch_dir(save_dir: str | os.PathLike) -> Path:
    return Path(save_dir) / "launch"


def read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AquilaError(f"{path}: file not found (no job was started there)") from None
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def job_id_for(save_dir: str | os.PathLike) -> str:
    """The job recorded in a save dir: job.env's JOB_ID, else (bmtrain_mgpu.sh run by hand) a node pid file's."""
    ldir = launch_dir(save_dir)
    if (ldir / "job.env").is_file():
        return read_env_file(ldir / "job.env")["JOB_ID"]
    for pidfile in sorted(ldir.glob("node*.pid")):
        for field in pidfile.read_text().split():
            if field.startswith("job="):
                return field[len("job=") :]
    raise AquilaError(f"no job recorded in {ldir}")


def record_node(save_dir: str | os.PathLike, rank: int, pid: int, job_id: str) -> None:
    line = f"pid={pid} pgid={os.getpgid(pid)} host={socket.gethostname()} job={job_id}\n"
    write_text_atomic(launch_dir(save_dir) / f"node{rank}.pid", line)


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def job_processes(job_id: str) -> list[int]:
    """PIDs on this machine (not zombies, not us or our parents) whose environment has AQUILA_JOB_ID=job_id."""
    marker = f"AQUILA_JOB_ID={job_id}".encode()
    skip = _ancestors()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            if marker not in Path(entry.path, "environ").read_bytes().split(b"\0"):
                continue
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            found.append(int(entry.name))
    return sorted(found)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def stop_job(job_id: str, timeout: float = 15.0) -> tuple[list[int], list[int]]:
    """SIGTERM the job's processes on this machine; SIGKILL what is left after `timeout` s.
    Returns (all the job's processes seen, those that needed SIGKILL).

    torchrun is spared once it has been seen with workers: told to stop, it would SIGTERM them again and SIGKILL
    them 30 s later, cutting short the checkpoint they write on SIGTERM. The workers and the node script (which
    records exit status 143 once torchrun is done) get the signal; torchrun ends by itself when its workers have.
    A torchrun still waiting for the other nodes (no workers yet) is signalled like the rest."""
    seen: set[int] = set()
    termed: set[int] = set()
    spared: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        left = job_processes(job_id)
        seen |= set(left)
        if not left:
            return sorted(seen), []
        if time.monotonic() >= deadline:
            break
        parent = {p: _parent(p) for p in left}
        has_children = set(parent.values())
        spared |= {p for p in left if p in has_children and parent[p] in parent}  # torchrun with its workers
        todo = [p for p in left if p not in spared and p not in termed]
        _signal_all(todo, signal.SIGTERM)
        termed |= set(todo)
        time.sleep(0.2)
    _signal_all(left, signal.SIGKILL)
    return sorted(seen), left


def start_job(save_dir: str | os.PathLike, proj_home: str | os.PathLike, job_id: str, fields: dict[str, str]) -> None:
    """Refuse if this save dir's previous job still runs here; clear its stale node files; record the new job."""
    ldir = launch_dir(save_dir)
    old = ldir / "job.env"
    if old.is_file():
        old_id = read_env_file(old).get("JOB_ID", "")
        if old_id and job_processes(old_id):
            raise AquilaError(
                f"{save_dir} already has a running job ({old_id}); stop it with local_stop_docker.sh or "
                f"dist_stop_docker.sh, or use another experiment name"
            )
    try:
        ldir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AquilaError(f"cannot create {ldir} ({e.strerror})") from None
    for pattern in ("node*.pid", "node*.exit", "node*.stopped*"):
        for stale in ldir.glob(pattern):
            stale.unlink(missing_ok=True)
    body = "".join(f"{k}={v}\n" for k, v in {"JOB_ID": job_id, **fields}.items())
    write_text_atomic(old, body)
    write_text_atomic(Path(proj_home) / "checkpoints_out" / LATEST, f"{Path(save_dir).resolve()}\n")


def find_save_dir(proj_home: str | os.PathLike, exp_name: str | None, version: str | None) -> Path:
    """The save dir of exp/version, the newest version of exp, or the latest triggered job."""
    out = Path(proj_home) / "checkpoints_out"
    if exp_name is None:
        latest = out / LATEST
        if not latest.is_file():
            raise AquilaError(f"no job recorded in {latest}; pass <exp_name> [<exp_version>]")
        return Path(latest.read_text(encoding="utf-8").strip())
    if version is not None:
        return out / exp_name / version
    versions = sorted(p.parent.parent for p in (out / exp_name).glob("*/launch/job.env"))
    if not versions:
        raise AquilaError(f"no launched job under {out / exp_name}")
    return versions[-1]


def _read_exit(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


_ROOT_CAUSE = re.compile(
    r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+) \(local_rank: (\d+)\).*?exitcode\s*:\s*(-?\d+)"
    r"[^\n]*?(?:\((SIG[A-Z0-9]+)\))?\s*\n",
    re.DOTALL,
)
_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?(error: .*)$", re.MULTILINE)


def _read_log(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def failed_rank(log_text: str) -> tuple[int, int, int, str] | None:
    """(rank, local_rank, exitcode, signal name or '') of torchrun's "Root Cause" report in a node's log."""
    found = list(_ROOT_CAUSE.finditer(log_text))
    if not found:
        return None
    m = found[-1]
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4) or ""


def first_error_line(log_text: str) -> str | None:
    m = _ERROR_LINE.search(log_text)
    return m.group(1).strip() if m else None


_TRAINER_STOP = re.compile(r"stopped by (.+?) at iteration (\d+): (.+?); exit status 75")


def trainer_stop(log_text: str) -> tuple[str, int, str] | None:
    """(signal, iteration, "checkpoint <dir>" or why there is none) of the trainer's last stop line in a log."""
    found = list(_TRAINER_STOP.finditer(log_text))
    if not found:
        return None
    m = found[-1]
    return m.group(1), int(m.group(2)), m.group(3)


def _relative(path: str, proj_home: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(proj_home.resolve()))
    except ValueError:
        return path


def resume_command(save_dir: str | os.PathLike, env: dict[str, str]) -> str:
    """The trigger command that started the job recorded in `env` (job.env): running it again resumes."""
    proj_home = Path(save_dir).resolve().parents[2]  # <proj_home>/checkpoints_out/<exp>/<version>
    hostfile = _relative(env.get("HOSTFILE", "<hostfile>"), proj_home)
    config = _relative(env.get("CONFIG", "<config>"), proj_home)
    exp = env.get("JOB_ID", "").split("/")[0] or "<exp>"
    words = [hostfile, config, env.get("MODEL_NAME", "<model>"), exp]
    return f"bash dist_trigger_docker.sh {' '.join(shlex.quote(w) for w in words)} (from {proj_home})"


def stop_report(save_dir: str | os.PathLike, codes: dict[int, int | None]) -> str:
    """One line for a job whose nodes all stopped (75) or some were stopped before a checkpoint (143)."""
    ldir = launch_dir(save_dir)
    env = read_env_file(ldir / "job.env")
    job_id = env["JOB_ID"]
    again = resume_command(save_dir, env)
    if any(c == TERMINATED for c in codes.values()):
        where = ", ".join(str(r) for r, c in sorted(codes.items()) if c == TERMINATED)
        return (
            f"stopped: job {job_id} was stopped (SIGTERM) on node {where} before its training processes saved a "
            f"checkpoint; running the same command starts it again (from the latest checkpoint, if any): {again}"
        )
    reasons = {(ldir / f"node{r}.stopped").read_text().strip() for r in codes if (ldir / f"node{r}.stopped").is_file()}
    how = (
        "by the stop scripts (SIGTERM)"
        if "by=stop" in reasons
        else "by SIGTERM to its training processes (a preemption)"
    )
    head, resume = f"stopped: job {job_id} was stopped {how}", f"run the same command to resume: {again}"
    found = trainer_stop(_read_log(env.get("LOGFILE", "")))
    if found is None:  # a script of your own (SCRIPT_FILE) that exits 75 without the trainer's line
        return f"{head} after saving a checkpoint; {resume}"
    _, step, saved = found
    if not saved.startswith("checkpoint "):  # "no checkpoint (save_dir is not set)"
        return f"{head} at iteration {step} with {saved}; nothing to resume from"
    return f"{head} at iteration {step}; {saved} saved; {resume}"


def stop_summary(proj_home: str | os.PathLike, job_id: str) -> str | None:
    """After a stop on the machine that runs node 0: what the job saved and how to resume (None elsewhere)."""
    parts = job_id.split("/")
    if len(parts) < 2:
        return None
    save_dir = Path(proj_home) / "checkpoints_out" / parts[0] / parts[1]
    ldir = launch_dir(save_dir)
    try:
        node0 = (ldir / "node0.pid").read_text()
        env = read_env_file(ldir / "job.env")
    except (OSError, AquilaError):
        return None
    if f"host={socket.gethostname()}" not in node0.split() or env.get("JOB_ID") != job_id:
        return None
    nodes = int(env.get("NODES_NUM", "1"))
    codes = {r: _read_exit(ldir / f"node{r}.exit") for r in range(nodes)}
    if codes.get(0) not in (STOPPED, TERMINATED):
        return None
    return stop_report(save_dir, {r: c for r, c in codes.items() if c in (STOPPED, TERMINATED)})


def _culprit(failed: dict[int, int], logs: dict[int, str], exit_times: dict[int, float]) -> int:
    """The node that failed first: one whose worker was killed by a signal (its peers then fail with connection
    errors), else the earliest exit status on record."""
    signalled = [r for r in failed if (f := failed_rank(logs[r])) is not None and f[2] < 0]
    if signalled:
        return min(signalled)
    return min(failed, key=lambda r: (exit_times.get(r, float("inf")), r))


_EADDRINUSE = re.compile(r"port: (\d+),[^\n]*name: EADDRINUSE")  # torchrun's store could not bind the port


def _failed(codes: dict[int, int | None]) -> dict[int, int]:
    return {r: c for r, c in codes.items() if c not in (None, 0, STOPPED, TERMINATED)}


def follow(
    save_dir: str | os.PathLike, log: str | os.PathLike, start_timeout: float = 300.0, settle: float = 5.0
) -> int:
    """Stream `log` until every node has an exit status. Return 0 when all finished; 75 when the job stopped on
    SIGTERM after saving a checkpoint (the stop scripts, or a preemption signalling the training processes), with
    one `stopped:` line naming the step and the command that resumes; 143 when a node was stopped before a
    checkpoint; else the status of the node that failed first, with an `error:` line.

    When a node fails, the others get `settle` seconds to record theirs, so the report names the node (and rank)
    that died rather than a peer that failed because of it."""
    ldir = launch_dir(save_dir)
    env = read_env_file(ldir / "job.env")
    job_id, nodes = env["JOB_ID"], int(env["NODES_NUM"])
    here = socket.gethostname()
    started = time.monotonic()
    pos = 0
    out = sys.stdout.buffer

    def pump() -> None:
        nonlocal pos
        try:
            with open(log, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        if chunk:
            pos += len(chunk)
            out.write(chunk)
            out.flush()

    def node_log(rank: int) -> str:
        return env.get("LOGFILE", "") if rank == 0 else f"{ldir}/node{rank}.log.txt"

    def read_codes() -> dict[int, int | None]:
        return {r: _read_exit(ldir / f"node{r}.exit") for r in range(nodes)}

    def fail(rank: int, code: int, why: str) -> int:
        pump()
        text = _read_log(node_log(rank))
        where = f"node {rank}"
        try:
            where += f" ({parse_hostfile(env['HOSTFILE'])[rank].address})"
        except (AquilaError, KeyError, IndexError):
            pass
        detail = failed_rank(text)
        if detail is not None:
            dead, local, exitcode, sig = detail
            where += f" rank {dead} (local_rank {local}, exitcode {exitcode}{' ' + sig if sig else ''})"
        print(f"error: {where} {why} (exit status {code}); log: {node_log(rank)}", file=sys.stderr)
        line = first_error_line(text)
        if line:
            print(f"node {rank} log: {line}", file=sys.stderr)
        busy = _EADDRINUSE.search(text)
        if busy:
            print(
                f"node {rank} log: torchrun could not bind the master port {busy.group(1)} (EADDRINUSE): another "
                f"process took it after the launcher's check; set MASTER_PORT to a free port",
                file=sys.stderr,
            )
        return code or 1

    def settled(codes: dict[int, int | None]) -> dict[int, int | None]:
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and any(c is None for c in codes.values()):
            time.sleep(0.2)
            codes = read_codes()
        return codes

    def first_failure(codes: dict[int, int | None]) -> int:
        failed = _failed(settled(codes))
        times = {r: (ldir / f"node{r}.exit").stat().st_mtime for r in failed}
        culprit = _culprit(failed, {r: _read_log(node_log(r)) for r in failed}, times)
        return fail(culprit, failed[culprit], "failed")

    def stopped(codes: dict[int, int | None]) -> int:
        pump()
        stops = {r: c for r, c in codes.items() if c}
        print(stop_report(save_dir, stops), file=sys.stderr)
        return TERMINATED if TERMINATED in stops.values() else STOPPED

    while True:
        pump()
        codes = read_codes()
        if _failed(codes):
            return first_failure(codes)
        if all(code is not None for code in codes.values()):
            return 0 if not any(codes.values()) else stopped(codes)
        if TERMINATED in codes.values():
            # A node stopped before its trainers checkpointed: the others may wait for it for ever. (Nodes that
            # stopped with a checkpoint need no such limit: every rank stops at the same step, and saving may
            # take long.)
            codes = settled(codes)
            return first_failure(codes) if _failed(codes) else stopped(codes)
        running = None
        for r, code in codes.items():
            if code is not None:
                continue
            pidfile = ldir / f"node{r}.pid"
            if not pidfile.is_file():
                if time.monotonic() - started > start_timeout:
                    return fail(r, 1, f"did not start within {start_timeout:.0f} s")
                continue
            fields = dict(kv.split("=", 1) for kv in pidfile.read_text().split() if "=" in kv)
            if fields.get("host") != here:
                continue  # a remote node: its exit file arrives through the shared filesystem
            if running is None:
                running = set(job_processes(job_id))
            if int(fields.get("pid", "0")) not in running:
                time.sleep(0.5)  # it may be writing its exit file right now
                if _read_exit(ldir / f"node{r}.exit") is None:
                    return fail(r, 1, "died without recording an exit status")
        time.sleep(0.5)
