"""The CPU-safe parts of bench/gpu_check.sh: shell syntax, and the whole report on CPU with a micro model."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.train_helpers import REPO


def test_gpu_check_shell_syntax():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0


@pytest.mark.slow
def test_gpu_check_report_on_cpu_never_crashes():
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--model", "aquila-micro", "--seq", "32"]
    cmd += ["--batch", "2", "--steps", "1", "--warmup", "1"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    table = res.stdout
    for needle in ("| torch ", "| flash-attn ", "| attention path ", "| tokens/s ", "| MFU vs measured matmul peak "):
        assert needle in table, table
    assert "| BMTrain step " in table and "error:" not in table, table
    assert re.search(r"\| trainer 3 steps aquila-micro fsdp fp32 +\| ok in", table), table
