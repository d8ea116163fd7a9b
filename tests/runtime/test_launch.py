"""largo.runtime.launch: torchrun that exits as its first failed worker did, so that a TrainJob's
permanentExitCodes see the trainer's own code (torchrun alone exits 1 for any)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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
