"""``largo dev up|down|status``: the local cluster from a terminal, on the same code as the test fixture."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from largo.dev.cluster import ClusterError, ClusterSpec, LocalCluster, LocalNodePool, NodePool, wait_for
from largo.dev.localnode import main as localnode_main
from largo.dev.localnode.logs import latest_log

_READY_FILE = "ready"
_PID_FILE = "supervisor.pid"


def default_workdir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("LARGO_DEV_DIR") or Path(base) / "largo" / "dev-cluster")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = subparsers.add_parser("dev", help="a local Kubernetes cluster for development and tests")
    commands = dev.add_subparsers(dest="dev_command", required=True)
    up = commands.add_parser("up", help="start the local cluster (foreground unless --detach)")
    up.add_argument("--nodes", type=int, default=2, help="kwok GPU nodes (default 2)")
    up.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per node (default 8)")
    up.add_argument("--cpu", default="64", help="cpu per node (default 64)")
    up.add_argument("--memory", default="512Gi", help="memory per node (default 512Gi)")
    up.add_argument("--nodes-per-rack", type=int, default=0, help="label nodes into racks of this size")
    up.add_argument(
        "--local-nodes", type=int, default=0, help="localnode nodes whose pods run as processes (needs root)"
    )
    up.add_argument("--workdir", type=Path, default=None, help="state directory (default: user cache)")
    up.add_argument("--detach", action="store_true", help="run in the background; stop with `largo dev down`")
    up.set_defaults(handler=_up)
    down = commands.add_parser("down", help="stop the local cluster started with --detach")
    down.add_argument("--workdir", type=Path, default=None)
    down.set_defaults(handler=_down)
    status = commands.add_parser("status", help="say whether the local cluster runs, and its nodes")
    status.add_argument("--workdir", type=Path, default=None)
    status.set_defaults(handler=_status)
    localnode_main.add_parsers(commands)
    logs = commands.add_parser("logs", help="print a localnode pod's container log")
    logs.add_argument("pod")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-c", "--container", default=None)
    logs.add_argument("-p", "--previous", action="store_true", help="the run before the current one")
    logs.add_argument("--logs-dir", type=Path, default=None, help="default: the `largo dev up` cluster's")
    logs.set_defaults(handler=_logs)


def _logs(args: argparse.Namespace) -> int:
    logs_dir: Path = args.logs_dir or default_workdir() / "cluster" / "localnode" / "logs"
    try:
        path = latest_log(logs_dir, args.pod, args.namespace, args.container, args.previous)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    sys.stdout.write(path.read_text(errors="replace"))
    return 0


def _supervisor_pid(workdir: Path) -> int | None:
    try:
        pid = int((workdir / _PID_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def _up(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir or default_workdir()
    if _supervisor_pid(workdir) is not None:
        print(f"a local cluster already runs from {workdir}; `largo dev down` stops it", file=sys.stderr)
        return 1
    # Only the cluster's own state is wiped: a detached start's supervisor.log, written by the parent
    # into the same workdir before this process started, must survive to tell why a start failed.
    shutil.rmtree(workdir / "cluster", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (workdir / _READY_FILE).unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.detach:
        return _detach(args, workdir)

    pool = NodePool(
        count=args.nodes, gpus=args.gpus, cpu=args.cpu, memory=args.memory, nodes_per_rack=args.nodes_per_rack
    )
    local = (LocalNodePool(count=args.local_nodes),) if args.local_nodes else ()
    pools = (pool,) if args.nodes else ()
    cluster = LocalCluster(ClusterSpec(node_pools=pools, local_nodes=local), workdir / "cluster")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    (workdir / _PID_FILE).write_text(str(os.getpid()))
    try:
        cluster.start()
        (workdir / _READY_FILE).write_text(str(cluster.kubeconfig))
        print(f"local cluster up: {cluster.server}")
        print(f"  export KUBECONFIG={cluster.kubeconfig}")
        print("  kubectl get nodes")
        sys.stdout.flush()
        while not stop.wait(1.0):
            cluster.assert_running()
    except ClusterError as error:
        print(f"local cluster failed: {error}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        shutil.rmtree(workdir / "cluster" / "etcd", ignore_errors=True)
        for name in (_READY_FILE, _PID_FILE):
            with contextlib.suppress(FileNotFoundError):
                (workdir / name).unlink()
    return 0


def _detach(args: argparse.Namespace, workdir: Path) -> int:
    command = [sys.executable, "-m", "largo", "dev", "up", "--workdir", str(workdir)]
    command += ["--nodes", str(args.nodes), "--gpus", str(args.gpus), "--cpu", args.cpu]
    command += ["--memory", args.memory, "--nodes-per-rack", str(args.nodes_per_rack)]
    command += ["--local-nodes", str(args.local_nodes)]
    log = workdir / "supervisor.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def exited() -> None:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise ClusterError(f"the cluster supervisor exited; see {log}:\n{tail}")

    try:
        wait_for(lambda: (workdir / _READY_FILE).exists(), 900, "the local cluster", exited)
    except ClusterError as error:
        print(error, file=sys.stderr)
        return 1
    kubeconfig = (workdir / _READY_FILE).read_text()
    print(f"local cluster up in the background (pid {process.pid}); logs in {workdir}")
    print(f"  export KUBECONFIG={kubeconfig}")
    print("  kubectl get nodes        # and `largo dev down` to stop it")
    return 0


def _down(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir or default_workdir()
    pid = _supervisor_pid(workdir)
    if pid is None:
        print("no local cluster runs")
        return 0
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: _supervisor_pid(workdir) is None or not _alive(pid), 60, "the cluster to stop")
    print("local cluster stopped")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still answers signal 0; its /proc state says it is gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _status(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir or default_workdir()
    pid = _supervisor_pid(workdir)
    ready = workdir / _READY_FILE
    if pid is None or not ready.exists():
        print("no local cluster runs")
        return 3
    kubeconfig = ready.read_text()
    print(f"local cluster runs (pid {pid}); KUBECONFIG={kubeconfig}")
    from largo.dev import tools

    result = subprocess.run(
        [tools.locate().path("kubectl"), "--kubeconfig", kubeconfig, "get", "nodes"], check=False
    )
    return result.returncode
