"""Trainer gangs for the runtime tests: torchrun "nodes" with exactly the environment the TrainJob
builder renders (the master address mapped to loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from largo.api.v1alpha1 import TrainJob
from largo.dev.cluster import free_port
from largo.manifests.trainjob import build_pod
from largo.runtime import checkpoint
from largo.runtime.parallel import Layout
from prometheus_client.parser import text_string_to_metric_families

STEPS = 60
# Small and single-threaded: four ranks share two cores, and one thread per rank keeps results exact.
TRAIN_ARGS = ["--batch-size", "8", "--context", "32", "--width", "32", "--log-every", "1"]


NODES, PROCS_PER_NODE = 2, 2


def contract_env(
    rank: int, port: int, checkpoints: Path, parallelism: dict[str, int] | None = None
) -> dict[str, str]:
    """The trainer container's env for ``rank`` as largo renders it, with DNS mapped to loopback."""
    job = TrainJob.from_body(
        {
            "metadata": {"name": "demo", "namespace": "research"},
            "spec": {
                "image": "trainer",
                "numNodes": NODES,
                "procsPerNode": PROCS_PER_NODE,
                "checkpoint": {"claimName": "demo-checkpoints"},
                "parallelism": parallelism or {},
            },
        }
    )
    container = build_pod(job, rank, f"node-{rank}", attempt=0)["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["PET_MASTER_ADDR"] == "demo-node-0.demo.research.svc"
    assert env["LARGO_BACKEND"] == "gloo"
    env["PET_MASTER_ADDR"] = "127.0.0.1"
    env["PET_MASTER_PORT"] = str(port)
    env["LARGO_CHECKPOINT_DIR"] = str(checkpoints)
    return env


class Gang:
    """Two torchrun "nodes" of two processes each, as two pods of one TrainJob would run."""

    def __init__(
        self,
        workdir: Path,
        checkpoints: Path,
        steps: int = STEPS,
        extra: list[str] | None = None,
        parallelism: dict[str, int] | None = None,
        node_checkpoints: list[Path] | None = None,
    ):
        self.workdir = workdir
        self.checkpoints = checkpoints
        # Each node's view of the checkpoint directory, where they differ (a network filesystem's).
        self.node_checkpoints = node_checkpoints
        self.steps = steps
        self.extra = extra or []
        self.parallelism = parallelism or {}
        layout = Layout(
            NODES * PROCS_PER_NODE, self.parallelism.get("tensor", 1), self.parallelism.get("pipeline", 1)
        )
        self.reporter_node = layout.reporter // PROCS_PER_NODE
        self.nodes: list[subprocess.Popen[bytes]] = []
        self.attempt = 0

    def start(self) -> None:
        port = free_port()
        self.attempt += 1
        self.nodes = []
        for rank in range(NODES):
            env = {
                **os.environ,
                **contract_env(rank, port, self.directory_of(rank), self.parallelism),
                "OMP_NUM_THREADS": "1",
            }
            # No cluster to report progress to here, and no metrics port to take on the host.
            for name in ("LARGO_PROGRESS_CONFIGMAP", "LARGO_METRICS_PORT"):
                env.pop(name, None)
            log = (self.workdir / f"attempt{self.attempt}-node{rank}.log").open("wb")
            command = [sys.executable, "-m", "torch.distributed.run", "-m", "largo.runtime.train"]
            self.nodes.append(
                subprocess.Popen(
                    [
                        *command,
                        "--steps",
                        str(self.steps),
                        *TRAIN_ARGS,
                        "--checkpoint-every",
                        "20",
                        *self.extra,
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def directory_of(self, node: int) -> Path:
        return self.node_checkpoints[node] if self.node_checkpoints else self.checkpoints

    def wait(self, timeout: float = 240) -> list[int]:
        """Each node's exit code. A gang still running after ``timeout`` fails with the end of each node's
        log: what every rank last said is what tells a hang's cause."""
        try:
            return [node.wait(timeout=timeout) for node in self.nodes]
        except subprocess.TimeoutExpired:
            ends = "\n".join(f"--- node {rank}:\n{self.log(rank)[-3000:]}" for rank in range(len(self.nodes)))
            raise AssertionError(f"the gang still ran after {timeout:g} s\n{ends}") from None

    def log(self, rank: int = 0, attempt: int | None = None) -> str:
        return (self.workdir / f"attempt{attempt or self.attempt}-node{rank}.log").read_text(errors="replace")

    def losses(self, attempt: int | None = None) -> dict[int, float]:
        """The reporting rank's loss per step, from its JSON log lines."""
        out = {}
        for line in self.log(self.reporter_node, attempt).splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                out[record["step"]] = record["loss"]
        return out

    def kill_a_rank(self, node: int) -> int:
        """SIGKILLs one worker of ``node``'s torchrun, tears the whole gang down as the operator does, and
        returns the step of the checkpoint a restarted gang resumes from."""
        workers = children(self.nodes[node].pid)
        assert workers, f"torchrun of node {node} has no worker processes"
        os.kill(workers[0], signal.SIGKILL)
        self.nodes[node].wait(timeout=60)
        self.kill()
        return checkpoint.complete(self.checkpoints)[0][0]

    def kill(self) -> None:
        for node in self.nodes:
            if node.poll() is None:
                # torchrun starts each worker in a session of its own: its process group is not theirs.
                workers = children(node.pid)
                os.killpg(node.pid, signal.SIGKILL)
                for worker in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker, signal.SIGKILL)
                node.wait()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def scrape(port: int) -> dict[str, float] | None:
    """The trainer's /metrics on ``port`` as {name: value}, a labelled kind as "name:kind"; None while
    nothing answers there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            kind = sample.labels.get("kind")
            samples[f"{sample.name}:{kind}" if kind else sample.name] = sample.value
    return samples
