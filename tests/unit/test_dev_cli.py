"""`largo dev up --detach` when the cluster cannot start: the error and the supervisor's log, not a
traceback of the parent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from largo.dev.tools import TOOL_NAMES


def test_a_failing_detached_start_reports_the_supervisor_s_error(tmp_path: Path) -> None:
    tools = tmp_path / "tools" / "bin"
    tools.mkdir(parents=True)
    for name in TOOL_NAMES:  # every tool present, and every one fails at once
        (tools / name).write_text("#!/bin/sh\necho broken tool >&2\nexit 1\n")
        (tools / name).chmod(0o755)
    workdir = tmp_path / "dev"
    up = subprocess.run(
        [sys.executable, "-m", "largo", "dev", "up", "--detach", "--nodes", "1", "--workdir", str(workdir)],
        env={**os.environ, "LARGO_TOOLS_DIR": str(tmp_path / "tools")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert up.returncode == 1
    assert "the cluster supervisor exited" in up.stderr
    assert "local cluster failed" in up.stderr  # the supervisor's own error, from its log
    assert "Traceback" not in up.stderr.split("the cluster supervisor exited")[0]
    assert (workdir / "supervisor.log").exists()
