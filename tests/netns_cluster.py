"""Two real nodes on this machine for the tests: scripts/netns_cluster.sh (network namespaces node0/node1, each with
its own host name, pid table and sshd; two links between them). Skips, with the reason, where it cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "netns_cluster.sh"
ADDRS = {"node0": ("10.211.0.1", "10.211.1.1"), "node1": ("10.211.0.2", "10.211.1.2")}  # eth0, eth1


def _skip_reason(prefix: str) -> str | None:
    if os.geteuid() != 0:
        return "two-node tests need root for network namespaces (CAP_NET_ADMIN)"
    missing = [t for t in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "/usr/sbin/sshd") if not shutil.which(t)]
    if missing:
        return f"two-node tests need {', '.join(missing)} (make system-deps installs openssh-server iproute2)"
    probe = f"{prefix}probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetnsCluster:
    """A running cluster: `exec` runs a command on a node (its network, host name and processes)."""

    def __init__(self, state: Path, prefix: str):
        self.state, self.prefix = state, prefix
        self.ssh = f"ssh -F {state}/ssh_config"

    def argv(self, node: str, *cmd: str) -> list[str]:
        return ["bash", str(SCRIPT), "exec", str(self.state), node, *cmd]

    def run(self, node: str, *cmd: str, cwd: Path, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
        env = {**env, "NETNS_PREFIX": self.prefix}
        return subprocess.run(self.argv(node, *cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

    def popen(self, node: str, *cmd: str, cwd: Path, env: dict) -> subprocess.Popen:
        env = {**env, "NETNS_PREFIX": self.prefix}
        return subprocess.Popen(self.argv(node, *cmd), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def ip(self, node: str, *args: str) -> None:
        subprocess.run(["ip", "-n", f"{self.prefix}{node}", *args], check=True, capture_output=True)


def start_cluster(tmp_root: Path):
    """Generator for a fixture: yields a NetnsCluster and tears it down afterwards, whatever happened."""
    prefix = f"aq{os.getpid()}"  # unique namespace names: parallel runs and a hand-made cluster do not collide
    reason = _skip_reason(prefix)
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    state = tmp_root / "netns"
    env = {**os.environ, "NETNS_PREFIX": prefix}
    try:
        r = subprocess.run(["bash", str(SCRIPT), "up", str(state)], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"netns_cluster.sh up failed: {r.stdout}{r.stderr}"
        yield NetnsCluster(state, prefix)
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(state)], env=env, capture_output=True, timeout=60)
