"""Hostfile parsing, local-address detection and the pre-flight checks the launchers run before starting."""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from aquila.errors import AquilaError

DEFAULT_MASTER_PORT = 23456  # FlagAI's bmtrain_mgpu.sh value
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9._:%-]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
NAME_MAX = 255  # bytes in one directory name on Linux filesystems (names here are ASCII: one byte a character)


@dataclass(frozen=True)
class Node:
    rank: int  # 0-based line order among the hostfile's node lines
    address: str
    slots: int
    line: int  # 1-based line number in the hostfile, for messages


def parse_hostfile(path: str | os.PathLike) -> list[Node]:
    """`<address> slots=<n>` per line; `#` comments and blank lines allowed; line order is node rank."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AquilaError(f"hostfile {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AquilaError(f"hostfile {path}: cannot read ({e})") from None
    nodes: list[Node] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"hostfile {path} line {lineno}"
        fields = line.split()
        slot_fields = [f for f in fields[1:] if f.startswith("slots=")]
        if len(fields) != 2 or len(slot_fields) != 1:
            raise AquilaError(f"{where}: expected '<address> slots=<n>', got {line!r}")
        address, value = fields[0], slot_fields[0][len("slots=") :]
        if not _ADDRESS_RE.match(address):
            raise AquilaError(f"{where}: {address!r} is not a host name or IP address")
        if not re.fullmatch(r"[0-9]+", value):
            raise AquilaError(f"{where}: slots must be a positive integer, got {value!r}")
        slots = int(value)
        if slots < 1:
            raise AquilaError(f"{where}: slots must be a positive integer, got {slots}")
        key = address.lower()
        if key in seen:
            raise AquilaError(f"{where}: duplicate host {address!r} (already on line {seen[key]})")
        seen[key] = lineno
        nodes.append(Node(rank=len(nodes), address=address, slots=slots, line=lineno))
    if not nodes:
        raise AquilaError(f"hostfile {path}: no '<address> slots=<n>' lines")
    return nodes


@functools.lru_cache(maxsize=1)
def _interface_addresses() -> frozenset[str]:
    """Addresses on this machine's interfaces from `ip -o addr` (empty if the tool is missing)."""
    try:
        out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    found = set()
    for m in re.finditer(r"\binet6? ([0-9A-Fa-f.:]+)/", out):
        found.add(m.group(1).lower())
    return frozenset(found)


def _nonlocal_bind_enabled() -> bool:
    for name in ("/proc/sys/net/ipv4/ip_nonlocal_bind", "/proc/sys/net/ipv6/ip_nonlocal_bind"):
        try:
            if Path(name).read_text().strip() != "0":
                return True
        except OSError:
            pass
    return False


def _ip_is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.is_loopback:
        return True
    if str(ip).lower() in _interface_addresses():
        return True
    if _nonlocal_bind_enabled():
        return False  # the bind test below would accept any address
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(ip), 0))  # succeeds only for an address assigned to this machine
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=64)
def is_local_address(address: str) -> bool:
    """True when `address` is this machine: loopback, localhost, its host name or one of its addresses."""
    name = address.lower()
    hostname = socket.gethostname().lower()
    if name in {"localhost", hostname, hostname.split(".")[0], socket.getfqdn().lower()}:
        return True
    try:
        return _ip_is_local(ipaddress.ip_address(name.split("%")[0]))
    except ValueError:
        pass
    try:  # a host name: local if any address it resolves to is local; unresolvable names are remote
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return False
    return any(_ip_is_local(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos)


def is_loopback_name(address: str) -> bool:
    """`localhost` or a loopback IP literal: an address other machines cannot use to reach this one."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def resolves(address: str) -> bool:
    try:
        socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
        return True
    except (socket.gaierror, UnicodeError):
        return False


def master_port(env: dict[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    value = env.get("MASTER_PORT", "").strip()
    if not value:
        return DEFAULT_MASTER_PORT
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise AquilaError(f"MASTER_PORT must be a port number 1-65535, got {value!r}")
    return int(value)


def check_port_free(address: str, port: int) -> None:
    """Raise if something on this machine already listens on `port` (torchrun's store would fail to bind)."""
    busy = False
    try:
        with socket.create_connection((address, port), timeout=1):
            busy = True
    except OSError:
        pass
    if not busy:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
            except OSError:
                continue  # no IPv6 on this machine
            with s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                except OSError:
                    busy = True
                    break
    if busy:
        raise AquilaError(
            f"master port {port} on {address} is already in use (another job, or a stale one: see "
            f"local_stop_docker.sh); set MASTER_PORT to a free port"
        )


def check_name(kind: str, value: str) -> None:
    """A name that becomes one directory (checkpoints_out/<exp>, checkpoints_in/<model>) and a launcher argument."""
    if not value:
        raise AquilaError(f"{kind} is empty")
    if value in {".", ".."}:
        raise AquilaError(f"{kind} {value!r} is not allowed: '.' and '..' refer to directories, they are not names")
    if value.startswith("-"):
        raise AquilaError(f"{kind} {value!r} must not start with '-' (commands would read it as an option)")
    if not _NAME_RE.match(value):
        raise AquilaError(f"{kind} {value!r} may only contain letters, digits, '.', '_' and '-'")
    if len(value) > NAME_MAX:
        raise AquilaError(
            f"{kind} is {len(value)} characters long; it names a directory, so at most {NAME_MAX} are allowed"
        )


def check_model(model_name: str, proj_home: str | os.PathLike, yaml_data: dict | None = None) -> str:
    """The trainer's rule (aquila.train.model_source): the YAML's pre_load_dir (default checkpoints_in/)/model_name
    with config.json (and weights if bmt_pre_load), else a preset. Returns what will be loaded."""
    from aquila.train.model_source import locate_model

    check_name("model name", model_name)
    data = yaml_data or {}
    pre_load_dir = Path(proj_home) / str(data.get("pre_load_dir") or "checkpoints_in")
    return locate_model(model_name, pre_load_dir, data.get("bmt_pre_load") is True).describe()


def is_sft_config(config_path: str | os.PathLike, data: dict) -> bool:
    """SFT when the YAML's file name says so (sft/chat) or it has an SFT key (enable_sft_*, sft_*)."""
    if re.search(r"sft|chat", Path(config_path).name, re.IGNORECASE):
        return True
    return any(str(key).startswith(("enable_sft", "sft_")) for key in data)


def choose_script(config_path: str | os.PathLike, data: dict, script_dir: str | os.PathLike) -> Path:
    """$SCRIPT_FILE if set (relative to the current directory, then to the launcher's), else by `is_sft_config`."""
    override = os.environ.get("SCRIPT_FILE", "").strip()
    if override:
        candidates = [Path(override)] if Path(override).is_absolute() else [Path(override), Path(script_dir) / override]
        for c in candidates:
            if c.is_file():
                return c.resolve()
        raise AquilaError(f"SCRIPT_FILE {override!r}: file not found")
    name = "aquila_sft.py" if is_sft_config(config_path, data) else "aquila_pretrain.py"
    script = Path(script_dir) / name
    if not script.is_file():
        raise AquilaError(f"training script {script} not found (set SCRIPT_FILE to choose another)")
    return script.resolve()
