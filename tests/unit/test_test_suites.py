"""`make test`'s runner (hack/test-suites.py), stopped: its groups must not outlive it. An orphaned
group kept its local cluster's lock, and the next run failed on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from largo.dev.cluster import wait_for

RUNNER = Path(__file__).resolve().parents[2] / "hack" / "test-suites.py"

SLOW_TEST = """
import os, time
from pathlib import Path

def test_slow():
    Path(os.environ["MARK"]).write_text(str(os.getpid()))
    time.sleep(600)  # a suite still running when the runner is stopped
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its parent has not reaped it yet).
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_stopped_runner_stops_its_groups(tmp_path: Path) -> None:
    (tmp_path / "test_slow.py").write_text(SLOW_TEST)
    mark = tmp_path / "pid"
    driver = (
        "import importlib.util, sys\n"
        "from pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('suites', {str(RUNNER)!r})\n"
        "suites = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(suites)\n"
        f"suites.TESTS = Path({str(tmp_path)!r})\n"
        "suites.GROUPS = {'slow': ['test_slow.py']}\n"
        "sys.exit(suites.main(['-p', 'no:cacheprovider']))\n"
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", driver],
        env={**os.environ, "MARK": str(mark)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: mark.exists() and mark.read_text() != "", 60, "the group's test running")
        suite = int(mark.read_text())
        runner.send_signal(signal.SIGTERM)
        output, _ = runner.communicate(timeout=120)
        assert runner.returncode == 128 + signal.SIGTERM, output
        assert "SIGTERM: stopping slow" in output
        assert not _alive(suite), output  # the group's pytest went with it
    finally:
        runner.kill()
        if mark.exists() and mark.read_text() and _alive(int(mark.read_text())):
            os.kill(int(mark.read_text()), signal.SIGKILL)  # what a failing runner left
