"""Where localnode keeps container logs: ``<logs>/<namespace>_<pod>_<uid>/<container>/<restart>.log``."""

from __future__ import annotations

from pathlib import Path


def latest_log(logs_dir: Path, pod: str, namespace: str, container: str | None, previous: bool) -> Path:
    """The newest run's log of a pod's container (or the run before it), across the pod's incarnations."""
    candidates = sorted(logs_dir.glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no logs for pod {namespace}/{pod} in {logs_dir}")
    pod_dir = candidates[-1]
    containers = sorted(p.name for p in pod_dir.iterdir() if p.is_dir())
    if container is None:
        if len(containers) != 1:
            raise FileNotFoundError(f"pod {pod} has containers {', '.join(containers)}: choose one with -c")
        container = containers[0]
    runs = sorted((pod_dir / container).glob("*.log"), key=lambda p: int(p.stem))
    if not runs or (previous and len(runs) < 2):
        raise FileNotFoundError(f"no {'previous ' if previous else ''}log for {pod}/{container}")
    return runs[-2] if previous else runs[-1]
