"""Which network interface a node's collective traffic must use: the one holding its hostfile address.

Left alone, gloo binds the address its host name resolves to (often a loopback fallback) and NCCL the first
interface it likes; on a host with several NICs that is how FlagAI jobs hung (issues #368, #395). The launcher
sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME from this unless the user set them."""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import sys

from aquila.errors import AquilaError
from aquila.launch.hostfile import Node

_IP_ADDR_LINE = re.compile(r"^\d+:\s+(\S+)\s+inet6?\s+([0-9A-Fa-f.:]+)/\d+")


def interface_addresses(ip_output: str | None = None) -> dict[str, str]:
    """{address: interface} from `ip -o addr` (run here unless its output is given)."""
    if ip_output is None:
        try:
            ip_output = subprocess.run(
                ["ip", "-o", "addr"], capture_output=True, text=True, timeout=5, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise AquilaError(f"cannot list this node's network interfaces with 'ip -o addr' ({e})") from None
    out = {}
    for line in ip_output.splitlines():
        m = _IP_ADDR_LINE.match(line)
        if m:
            out[m.group(2).lower()] = m.group(1).split("@", 1)[0]
    return out


def _resolve(address: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(address.split("%")[0])]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def _is_loopback_or_link_local(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_link_local


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.split("%")[0])
        return True
    except ValueError:
        return False


def node_interface(hostfile: str, node: Node, multi_host: bool, ip_output: str | None = None) -> str:
    """The interface of this machine that holds `node`'s hostfile address; a one-line error if there is none.

    A host name that does not resolve here (an ssh alias) or resolves only to loopback here (Debian's 127.0.1.1
    line) says nothing about the interface: then "" (the libraries choose) and a warning."""
    by_address = interface_addresses(ip_output)
    loopback = next((name for addr, name in by_address.items() if ipaddress.ip_address(addr).is_loopback), "lo")
    where = f"hostfile {hostfile} line {node.line}: node {node.rank} address {node.address}"
    ips = _resolve(node.address)
    if not _is_ip(node.address) and multi_host and all(ip.is_loopback for ip in ips):
        seen = f"resolves only to {', '.join(map(str, ips))}" if ips else "does not resolve"
        print(
            f"warning: {where} {seen} on {socket.gethostname()}; GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME are left "
            f"to you (use the node's IP address in the hostfile to have them set)",
            file=sys.stderr,
        )
        return ""
    found = []
    for ip in ips:
        name = loopback if ip.is_loopback else by_address.get(str(ip).lower())
        if name and name not in found:
            found.append(name)
    if not found:
        usable = [(a, n) for a, n in by_address.items() if not _is_loopback_or_link_local(a)]
        have = ", ".join(f"{a} ({n})" for a, n in sorted(usable))
        resolved = "" if [str(i) for i in ips] == [node.address] else f" (resolves to {', '.join(map(str, ips))})"
        raise AquilaError(
            f"{where}{resolved} is on no network interface of {socket.gethostname()} "
            f"(it has {have or 'only loopback'}); put an address of this node in the hostfile"
        )
    if found == [loopback] and multi_host:
        raise AquilaError(
            f"{where} is loopback on {socket.gethostname()}, which the other hosts cannot reach; "
            f"use an address of one of its network interfaces"
        )
    return next(n for n in found if n != loopback) if len(found) > 1 else found[0]
