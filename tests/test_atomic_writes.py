"""aquila.io_utils: temporaries of killed writers are removed by the next write; disk errors are one line."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from aquila.errors import AquilaError
from aquila.io_utils import atomic_dir, atomic_path, remove_stale_temporaries, write_text_atomic

HOLD = (
    "import os, signal, sys, time\n"
    "from aquila.io_utils import atomic_path\n"
    "with atomic_path(sys.argv[1]) as tmp:\n"
    "    tmp.write_bytes(b'x' * 100000)\n"
    "    print('ready', flush=True)\n"
    "    if sys.argv[2] == 'kill':\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    time.sleep(60)\n"
)


def hidden(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def writer(target, mode):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "model.bin"
    proc = writer(target, "kill")
    assert proc.wait(timeout=30) == -signal.SIGKILL
    left = hidden(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".model.bin.{proc.pid}@") and left[0].endswith(".tmp")
    write_text_atomic(target, "new")
    assert hidden(tmp_path) == [] and target.read_text() == "new"


def test_live_writers_temporary_is_kept(tmp_path):
    target = tmp_path / "model.bin"
    proc = writer(target, "hold")
    try:
        write_text_atomic(target, "mine")
        assert len(hidden(tmp_path)) == 1  # the other writer's, still being written
        assert remove_stale_temporaries(target) == []
    finally:
        proc.kill()  # SIGKILL: it leaves its temporary, which the next write removes
        proc.wait(timeout=30)
    assert len(remove_stale_temporaries(target)) == 1 and hidden(tmp_path) == []


def test_other_hosts_and_fresh_legacy_temporaries_are_kept_old_legacy_removed(tmp_path):
    target = tmp_path / "d.idx"
    other = tmp_path / ".d.idx.1@some-other-host.ab12cd34.tmp"  # a live writer on another node of a shared FS
    fresh, old = tmp_path / ".d.idx.ab12cd34.tmp", tmp_path / ".d.idx.zz98yy76.tmp"
    unrelated = tmp_path / ".e.idx.zz98yy76.tmp"
    for p in (other, fresh, old, unrelated):
        p.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    os.utime(unrelated, (two_days_ago, two_days_ago))
    assert remove_stale_temporaries(target) == [old]
    assert hidden(tmp_path) == sorted(p.name for p in (other, fresh, unrelated))


def test_killed_atomic_dir_is_removed_by_the_next_one(tmp_path):
    code = (
        "import os, signal, sys\nfrom aquila.io_utils import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as d:\n    (d / 'w.bin').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")])
    assert r.returncode == -signal.SIGKILL and len(hidden(tmp_path)) == 1
    with atomic_dir(tmp_path / "out") as d:
        (d / "w.bin").write_bytes(b"done")
    assert hidden(tmp_path) == [] and (tmp_path / "out" / "w.bin").read_bytes() == b"done"


def test_target_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(AquilaError, match=r"afile/sub/out.bin: .*afile is a file, not a directory$"):
        write_text_atomic(tmp_path / "afile" / "sub" / "out.bin", "y")


def test_full_disk_is_one_line_naming_the_target_and_nothing_is_left(tmp_path):
    target = tmp_path / "big.bin"
    with pytest.raises(AquilaError, match=r"cannot write .*big.bin: No space left on device \(nothing written"):
        with atomic_path(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
