"""Service routing and DNS for the local cluster's localnode pods, with the real components:
kube-proxy (nftables mode) on the host, and CoreDNS with its kubernetes plugin on the pod bridge's
address (docs/localnode.md, "Services and DNS").

localnode pods share the host's network stack beyond their bridge, so one kube-proxy on the host
serves every localnode node; it programs one nftables table, ``kube-proxy``, which is host-wide: one
cluster with localnode nodes at a time, enforced by a lock that kube-proxy holds while it runs.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

from largo.dev import tools as tools_module

CLUSTER_DOMAIN = "cluster.local"
LOCK = Path("/run/largo/kube-proxy.lock")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# flock's exit code when the lock is taken (kube-proxy itself never exits with it).
LOCK_TAKEN = 75


class ServiceNetworkError(RuntimeError):
    pass


def corefile(gateway_ip: str, kubeconfig: Path, health_port: int, ready_port: int) -> str:
    """CoreDNS on the bridge address, answering the cluster's zones from the API server. Other names
    get no answer from it (this machine has no upstream to forward to)."""
    return f"""\
.:53 {{
    bind {gateway_ip}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        ttl 5
    }}
    cache 5
}}
"""


def kube_proxy_command(
    tools: tools_module.Tools,
    kubeconfig: Path,
    node_name: str,
    gateway: str,
    healthz_port: int,
    metrics_port: int,
) -> list[str]:
    """kube-proxy for the localnode pods, under the host-wide lock. ``gateway``: the bridge's address
    with the pod network's prefix (10.x.0.1/16)."""
    interface = ipaddress.ip_interface(gateway)
    return [
        "flock",
        "--nonblock",
        f"--conflict-exit-code={LOCK_TAKEN}",
        str(LOCK),
        tools.path("kube-proxy"),
        f"--kubeconfig={kubeconfig}",
        "--proxy-mode=nftables",
        f"--hostname-override={node_name}",
        f"--cluster-cidr={interface.network}",
        "--detect-local-mode=ClusterCIDR",
        # Replies from a pod on the same bridge must come back through the host to be un-NATed.
        "--masquerade-all",
        f"--nodeport-addresses={interface.ip}/32",
        # Leave the host's conntrack settings alone.
        "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=0",
        "--conntrack-tcp-timeout-close-wait=0",
        f"--healthz-bind-address=127.0.0.1:{healthz_port}",
        f"--metrics-bind-address=127.0.0.1:{metrics_port}",
        "--v=1",
    ]


def tool_env(tools: tools_module.Tools) -> dict[str, str]:
    """kube-proxy runs `nft`: the tools' own, first in PATH."""
    return {**os.environ, "PATH": f"{tools.bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}


def lock_free() -> bool:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["flock", "--nonblock", str(LOCK), "true"], check=False).returncode == 0


def kube_proxy_tables(tools: tools_module.Tools) -> list[str]:
    """The nftables tables kube-proxy made that exist now (none once it cleaned up)."""
    listed = subprocess.run(
        [tools.path("nft"), "list", "tables"],
        capture_output=True,
        text=True,
        check=False,
        env=tool_env(tools),
    )
    return [line.strip() for line in listed.stdout.splitlines() if line.split()[-1:] == ["kube-proxy"]]


def cleanup(tools: tools_module.Tools) -> None:
    """Removes every rule kube-proxy programs (its own --cleanup)."""
    subprocess.run(
        [tools.path("kube-proxy"), "--cleanup", "--proxy-mode=nftables"],
        capture_output=True,
        check=False,
        env=tool_env(tools),
    )


def enable_forwarding() -> str | None:
    """Turns IPv4 forwarding on (a pod's packets to a ClusterIP are routed by the host to the chosen
    pod); returns the value to restore, or None when it was on already."""
    before = IP_FORWARD.read_text().strip()
    if before == "1":
        return None
    IP_FORWARD.write_text("1\n")
    return before


def restore_forwarding(before: str | None) -> None:
    if before is not None:
        IP_FORWARD.write_text(f"{before}\n")
