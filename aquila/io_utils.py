"""Atomic writes: nothing half-written ever carries a final name.

A temporary is named `.<name>.<pid>@<host>.<random>.tmp` beside its target. The next write of the same
target removes the temporaries a dead process left behind (kill -9, power loss): same host, pid no
longer running. A live writer's temporary, or one from another host of a shared filesystem, is kept.
Temporaries of the older `.<name>.<random>.tmp` form are removed once untouched for a day.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from aquila.errors import AquilaError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


LEGACY_TMP_AGE_S = 24 * 3600
# The disk, not the code: a write failing with these is one line naming the target instead of a traceback.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}@{_host()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `path` left by dead writers (see the module docstring); returns them."""
    path = Path(path)
    ours = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)@([A-Za-z0-9_-]+)\.[^.]+\.tmp$")
    legacy = re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp$")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    host, now = _host(), time.time()
    for entry in entries:
        m = ours.match(entry.name)
        if m:
            stale = m.group(2) == host and not _pid_alive(int(m.group(1)))
        elif legacy.match(entry.name):
            try:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > LEGACY_TMP_AGE_S
            except OSError:
                continue
        else:
            continue
        if not stale:
            continue
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        above = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise AquilaError(f"cannot write {path}: {above} is a file, not a directory") from None
    except OSError as e:
        raise AquilaError(f"cannot write {path}: {e.strerror or e}") from None


def _disk_error(path: Path, e: OSError) -> AquilaError:
    return AquilaError(f"cannot write {path}: {e.strerror or e} (nothing written under that name)")


@contextlib.contextmanager
def disk_errors_name(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, a write failing for the disk's sake (full, quota, read-only) is an AquilaError naming `path`."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise _disk_error(Path(path), e) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A full disk (or quota, read-only filesystem, permission) while writing becomes one AquilaError naming
    `path`; the temporary is removed either way."""
    path = Path(path)
    _make_parent(path)
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _disk_error(path, e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with disk_errors_name(path):
            yield tmp_path
        # mkstemp makes 0600, and writers such as safetensors recreate the file 0600: final files get the usual mode.
        os.chmod(tmp_path, 0o666 & ~_umask())
        try:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        except OSError as e:
            raise _disk_error(path, e) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    _make_parent(path)
    remove_stale_temporaries(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _disk_error(path, e) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`, or an AquilaError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AquilaError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AquilaError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AquilaError(f"{path}: expected a JSON object")
    return data


def _unique_key_loader():
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: let PyYAML report it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int) -> None:
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML config as a dict (empty file: {}), or an AquilaError naming the file and, for syntax, the line.
    A key given twice in one mapping is an error naming both lines."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AquilaError(f"config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AquilaError(f"config {path}: cannot read ({e})") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as e:
        raise AquilaError(
            f"config {path}:{e.second}: key {e.key!r} is given twice (lines {e.first} and {e.second});"
            " keep one (YAML would silently take the last)"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise AquilaError(f"config {where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AquilaError(f"config {path}: expected a mapping of keys to values")
    return data
