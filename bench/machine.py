"""What every benchmark prints about the machine it ran on (imported by the bench scripts beside it)."""

import os
import platform
import re
from pathlib import Path


def cpu_name() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or "unknown CPU")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> str:
    """The 1-minute load average, or '' where the OS has none (other jobs skew CPU timings)."""
    return f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""


def status_kb(pid: int | str, field: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, ...; pid may be "self"), 0 where there is none."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0
