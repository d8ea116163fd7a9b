"""Where the upstream Kubernetes tools live, and how to build them when they are missing.

The versions and the cache layout have one owner, ``hack/build-tools.sh``; this module only asks it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

TOOL_NAMES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
    "prometheus",
    "promtool",
    "haproxy",
    "nft",
    "kube-proxy",
    "coredns",
)


class ToolsMissingError(RuntimeError):
    """The tools are not built and cannot be built from here."""


@dataclass(frozen=True, slots=True)
class Tools:
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def kwok_stages(self) -> Path:
        return self.root / "kwok-stages"

    @property
    def prometheus_operator_crds(self) -> Path:
        """ServiceMonitor, PodMonitor and PrometheusRule CRDs (one version-named directory)."""
        return sorted(self.root.glob("prometheus-operator-crds-*"))[-1]

    def path(self, name: str) -> str:
        return str(self.bin / name)

    def missing(self) -> list[str]:
        return [name for name in TOOL_NAMES if not (self.bin / name).is_file()]


def repo_root() -> Path | None:
    """The checkout this package runs from, found by the build script beside it."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "hack" / "build-tools.sh").is_file():
            return parent
    return None


def _build_script() -> Path:
    root = repo_root()
    if root is None:
        raise ToolsMissingError(
            "hack/build-tools.sh not found: set LARGO_TOOLS_DIR to a built tools directory"
        )
    return root / "hack" / "build-tools.sh"


def locate() -> Tools:
    """The tools directory, built or not: ``LARGO_TOOLS_DIR`` or the script's version-keyed default."""
    explicit = os.environ.get("LARGO_TOOLS_DIR")
    if explicit:
        return Tools(Path(explicit))
    out = subprocess.run(
        [str(_build_script()), "--print-dir"], check=True, capture_output=True, text=True
    ).stdout
    return Tools(Path(out.strip().splitlines()[-1]))


def ensure() -> Tools:
    """Returns the tools, building whatever is missing first (minutes on a cold cache)."""
    tools = locate()
    if tools.missing():
        subprocess.run([str(_build_script())], check=True)
    if tools.missing():
        raise ToolsMissingError(f"still missing after the build: {', '.join(tools.missing())}")
    return tools
