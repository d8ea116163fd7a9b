"""Pod networking on one host: a bridge shared by the nodes of a local cluster, and per pod a network
namespace joined to it by a veth pair, with its own address, /etc/hosts and resolv.conf.

Everything here shells out to iproute2 (``ip``), as a CNI bridge plugin would do through netlink.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

NETNS_PREFIX = "largo-"
_ETC_NETNS = Path("/etc/netns")
# No name server is reachable from a pod: unknown names fail at once instead of timing out.


class NetworkError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _short_hash(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:8]


def node_prefix(node: str) -> str:
    """Network namespaces of one node's pods start with this."""
    return f"{NETNS_PREFIX}{_short_hash(node)}-"


def sandbox_name(node: str, pod_uid: str) -> str:
    return f"{node_prefix(node)}{pod_uid[:8]}"


def host_veth(sandbox: str) -> str:
    """The host end of a sandbox's veth pair (interface names have at most 15 characters)."""
    return f"lv{_short_hash(sandbox)}"


@dataclass(frozen=True, slots=True)
class BridgeNetwork:
    """``gateway`` is the bridge's own address with the whole pod network's prefix (10.88.0.1/16);
    ``pod_cidr`` is the part this node hands out (10.88.1.0/24)."""

    bridge: str
    gateway: ipaddress.IPv4Interface
    pod_cidr: ipaddress.IPv4Network


@dataclass(slots=True)
class AddressPool:
    """Addresses of a node's pod CIDR, by pod UID (pure)."""

    network: ipaddress.IPv4Network
    reserved: set[ipaddress.IPv4Address] = field(default_factory=set)
    assigned: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)

    def allocate(self, uid: str) -> ipaddress.IPv4Address:
        if uid in self.assigned:
            return self.assigned[uid]
        used = set(self.assigned.values()) | self.reserved
        for address in self.network.hosts():
            if address not in used:
                self.assigned[uid] = address
                return address
        raise NetworkError(f"no free address left in {self.network}")

    def release(self, uid: str) -> None:
        self.assigned.pop(uid, None)


def ensure_bridge(network: BridgeNetwork) -> None:
    if _ip("link", "show", network.bridge, check=False).returncode != 0:
        result = _ip("link", "add", network.bridge, "type", "bridge", check=False)
        # Another node of the same cluster may have created it a moment ago.
        if result.returncode != 0 and _ip("link", "show", network.bridge, check=False).returncode != 0:
            raise NetworkError(f"cannot create bridge {network.bridge}: {result.stderr.strip()}")
    addresses = _ip("-o", "addr", "show", "dev", network.bridge).stdout
    if str(network.gateway) not in addresses:
        _ip("addr", "replace", str(network.gateway), "dev", network.bridge)
    _ip("link", "set", network.bridge, "up")


def remove_bridge_if_unused(network: BridgeNetwork) -> None:
    """The last node to stop removes the bridge: one with no interface attached is unused."""
    ports = Path(f"/sys/class/net/{network.bridge}/brif")
    if ports.is_dir() and not any(ports.iterdir()):
        _ip("link", "del", network.bridge, check=False)


def create_sandbox(
    network: BridgeNetwork, name: str, address: ipaddress.IPv4Address, hosts: str, resolv: str
) -> None:
    """A network namespace with ``address`` on eth0 (a veth into the bridge), loopback up, a default route
    through the bridge, and /etc/netns/<name>/{hosts,resolv.conf} for ``ip netns exec`` to mount."""
    etc = _ETC_NETNS / name
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(hosts)
    (etc / "resolv.conf").write_text(resolv)
    host_side = host_veth(name)
    peer = f"lp{_short_hash(name)}"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host_side, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", name)
        _ip("link", "set", host_side, "master", network.bridge)
        _ip("link", "set", host_side, "up")
        _ip("-n", name, "link", "set", peer, "name", "eth0")
        prefix = network.gateway.network.prefixlen
        _ip("-n", name, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "route", "add", "default", "via", str(network.gateway.ip))
    except NetworkError:
        delete_sandbox(name)
        raise


def write_hosts(name: str, hosts: str) -> bool:
    """Rewrites a sandbox's hosts file in place (``ip netns exec`` bind-mounts that very inode, so a
    rename would not reach running containers). Returns whether it changed."""
    path = _ETC_NETNS / name / "hosts"
    try:
        if path.read_text() == hosts:
            return False
        with path.open("r+") as file:
            file.write(hosts)
            file.truncate()
    except FileNotFoundError:
        return False
    return True


def sandbox_pids(name: str) -> list[int]:
    result = _ip("netns", "pids", name, check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def delete_sandbox(name: str) -> None:
    """Kills whatever still runs in the namespace, then removes it, its veth and its /etc/netns files."""
    for pid in sandbox_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    _ip("-n", name, "link", "del", "eth0", check=False)
    _ip("netns", "del", name, check=False)
    shutil.rmtree(_ETC_NETNS / name, ignore_errors=True)
    with contextlib.suppress(OSError):
        _ETC_NETNS.rmdir()  # only when empty


def list_sandboxes(prefix: str) -> list[str]:
    result = _ip("netns", "list", check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.startswith(prefix)]
