"""The master port's claim: checking that a port is free and taking it are one step.

A bind test alone leaves a window of seconds (until torchrun's store binds the port) in which a second trigger
sees the port free too, prints "started", and dies later with EADDRINUSE. So a trigger whose master is this
machine takes an exclusive `flock` on a per-port lock file first, then checks the port. The lock is held through a
file descriptor that the shell opened (`exec {fd}<>lockfile`) and that the job's local node scripts and torchrun
inherit: it lasts exactly as long as the job runs here, and the kernel drops it however the job ends (SIGKILL
included). The lock file holds the claiming job's id, for the message a second trigger prints.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from aquila.errors import AquilaError
from aquila.launch.hostfile import check_port_free


def _net_namespace() -> str:
    """This process's network namespace ('4026531840'), or '' if unknown: ports are per namespace."""
    try:
        return os.readlink("/proc/self/ns/net").split("[", 1)[1].rstrip("]")
    except (OSError, IndexError):
        return ""


def lock_dir() -> Path:
    return Path("/tmp") / f"aquila-{os.getuid()}"


def lock_path(port: int) -> Path:
    """`/tmp/aquila-<uid>/master-port-<port>[-net<namespace>].lock`, its directory made private to this user.

    Fixed under /tmp (not $TMPDIR or $XDG_RUNTIME_DIR, which differ between sessions) so that every trigger
    of this user on this machine finds the same file."""
    d = lock_dir()
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = d.stat()
    except OSError as e:
        raise AquilaError(f"cannot create the port lock directory {d} ({e.strerror})") from None
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise AquilaError(f"{d} belongs to another user or is writable by others; remove it")
    ns = _net_namespace()
    return d / f"master-port-{port}{'-net' + ns if ns else ''}.lock"


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def claim(fd: int, address: str, port: int, job_id: str) -> None:
    """Lock the port's file (opened by the shell as `fd`) for `job_id`, then check nothing listens on the port."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AquilaError(f"cannot lock the master port's file (fd {fd}): {e.strerror}") from None
        holder = _holder(fd)
        if not holder:  # it has the lock but has not written its id yet
            raise AquilaError(
                f"master port {port} on {address} is being claimed by another trigger at this moment; set "
                f"MASTER_PORT to a free port"
            ) from None
        raise AquilaError(
            f"master port {port} on {address} is already taken by job {holder}, started by another trigger; set "
            f"MASTER_PORT to a free port, or stop that job first (dist_stop_docker.sh <hostfile> --job-id {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{job_id}\n".encode(), 0)
    check_port_free(address, port)
