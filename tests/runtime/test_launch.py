"""largo.runtime.launch: torchrun that exits as its first failed worker did, so that a TrainJob's
permanentExitCodes see the trainer's own code (torchrun alone exits 1 for any)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from largo.api.v1alpha1 import TrainJob
from largo.manifests.trainjob import contract_env
from largo.runtime.launch import shell_code

WORKER = """
import os, signal, sys, time
rank = int(os.environ["LOCAL_RANK"])
how = sys.argv[1]
if rank == 1:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(int(how))
if how != "0":
    time.sleep(60)  # rank 0 is still working when its peer fails: torchrun stops it
"""


def _launch(module: str, tmp_path: Path, how: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_NPROC_PER_NODE": "2", "PET_STANDALONE": "1"}
    command = [sys.executable, "-m", module, "--monitor-interval", "0.1", str(script), how]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(("how", "code"), [("3", 3), ("kill", 137)])
def test_the_pod_exits_as_the_failed_worker_did(tmp_path: Path, how: str, code: int) -> None:
    launched = _launch("largo.runtime.launch", tmp_path, how)
    assert launched.returncode == code, launched.stderr
    assert "worker 1 (pid" in launched.stderr
    # What the pod exited with before: torchrun's 1, whatever the worker said.
    assert _launch("torch.distributed.run", tmp_path, how).returncode == 1


def test_workers_that_all_succeed_exit_zero(tmp_path: Path) -> None:
    assert _launch("largo.runtime.launch", tmp_path, "0").returncode == 0


def test_a_death_by_signal_reads_as_a_shell_reports_it() -> None:
    assert shell_code(-9) == 137
    assert shell_code(-15) == 143
    assert shell_code(2) == 2


SLOW_TO_STOP = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])

def stop(signum, frame):
    time.sleep(3)  # a last checkpoint being written
    (out / "checkpointed").write_text("done")
    sys.exit(143)

signal.signal(signal.SIGTERM, stop)
(out / "ready").write_text("")
time.sleep(120)
"""


def _stopped_with(env: dict[str, str], out: Path) -> int:
    """Runs one slow-to-stop worker under largo.runtime.launch, SIGTERMs it as the kubelet does, and
    returns the launcher's exit code."""
    script = out / "worker.py"
    script.write_text(SLOW_TO_STOP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_NPROC_PER_NODE": "1", "PET_STANDALONE": "1", **env}
    command = [sys.executable, "-m", "largo.runtime.launch", "--monitor-interval", "0.1", str(script)]
    command.append(str(out))
    launched = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "ready").exists():
        assert launched.poll() is None, "the launcher exited before its worker started"
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    launched.send_signal(signal.SIGTERM)
    return launched.wait(timeout=60)


def test_torchrun_waits_for_the_last_checkpoint_as_long_as_the_pod_s_grace_period(tmp_path: Path) -> None:
    job = TrainJob.from_body(
        {
            "metadata": {"name": "j", "namespace": "ns"},
            "spec": {"image": "i", "numNodes": 1, "podTemplate": {"terminationGracePeriodSeconds": 20}},
        }
    )
    given = {e["name"]: e["value"] for e in contract_env(job, 0, 0) if e["name"] == "PET_SHUTDOWN_TIMEOUT"}
    assert given == {"PET_SHUTDOWN_TIMEOUT": "20"}
    (patient := tmp_path / "patient").mkdir()
    assert _stopped_with(given, patient) == 143
    assert (patient / "checkpointed").read_text() == "done"
    # A shorter wait (torchrun's own is 30 s, whatever the grace period) kills the worker mid-write.
    (hasty := tmp_path / "hasty").mkdir()
    _stopped_with({"PET_SHUTDOWN_TIMEOUT": "1"}, hasty)
    assert not (hasty / "checkpointed").exists()
