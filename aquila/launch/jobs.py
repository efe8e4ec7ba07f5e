"""One launched job: its record files, finding exactly its processes, stopping them, following its log.

Every process of a job carries `AQUILA_JOB_ID=<id>` in its environment (the launchers set it for each node's
bmtrain_mgpu.sh; torchrun and the workers inherit it), so a stop ends that job and nothing else, even after
PIDs are reused. Record files live in `<save_dir>/launch/`:

- `job.env`          JOB_ID, HOSTFILE, CONFIG, MODEL_NAME, NODES_NUM, LOGFILE (written by the trigger)
- `node<r>.pid`      `pid=<p> pgid=<g> host=<hostname> job=<id>` of node r's bmtrain_mgpu.sh
- `node<r>.exit`     that script's exit status, written when it ends

and `<proj_home>/checkpoints_out/latest_job.txt` holds the save dir of the most recent trigger.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

from aquila.errors import AquilaError
from aquila.io_utils import write_text_atomic
from aquila.launch.hostfile import parse_hostfile

LATEST = "latest_job.txt"


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
    ldir.mkdir(parents=True, exist_ok=True)
    for stale in list(ldir.glob("node*.pid")) + list(ldir.glob("node*.exit")):
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


def _culprit(failed: dict[int, int], logs: dict[int, str], exit_times: dict[int, float]) -> int:
    """The node that failed first: one whose worker was killed by a signal (its peers then fail with connection
    errors), else the earliest exit status on record."""
    signalled = [r for r in failed if (f := failed_rank(logs[r])) is not None and f[2] < 0]
    if signalled:
        return min(signalled)
    return min(failed, key=lambda r: (exit_times.get(r, float("inf")), r))


def follow(
    save_dir: str | os.PathLike, log: str | os.PathLike, start_timeout: float = 300.0, settle: float = 5.0
) -> int:
    """Stream `log` until every node has an exit status; return 0, or the status of the node that failed first.

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
        return code or 1

    def first_failure(codes: dict[int, int | None]) -> int:
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and any(c is None for c in codes.values()):
            time.sleep(0.2)
            codes = {r: _read_exit(ldir / f"node{r}.exit") for r in range(nodes)}
        failed = {r: c for r, c in codes.items() if c}
        times = {r: (ldir / f"node{r}.exit").stat().st_mtime for r in failed}
        culprit = _culprit(failed, {r: _read_log(node_log(r)) for r in failed}, times)
        code = failed[culprit]
        return fail(culprit, code, "was stopped (SIGTERM, e.g. by dist_stop_docker.sh)" if code == 143 else "failed")

    while True:
        pump()
        codes = {r: _read_exit(ldir / f"node{r}.exit") for r in range(nodes)}
        if any(codes.values()):
            return first_failure(codes)
        if all(code == 0 for code in codes.values()):
            pump()
            return 0
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
                code = _read_exit(ldir / f"node{r}.exit")
                if code is None:
                    return fail(r, 1, "died without recording an exit status")
                if code:
                    return first_failure({**codes, r: code})
        time.sleep(0.5)
