"""`make demo` as a user runs it: twice in a row, and once stopped with Ctrl-C in the middle of serving;
every run ends with nothing left behind (processes, network namespaces, kube-proxy's rules, the cluster's
directory). It starts a local cluster of its own, so it runs outside the e2e package's cluster."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from largo.dev import tools
from largo.dev.localnode.network import NETNS_PREFIX

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NOTHING_LEFT = "left behind: no process, network namespace, mount or kube-proxy rule"


def _demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        # Shorter than a user's run (100 steps, a 6 s burst); the same parts and checks.
        [sys.executable, "-m", "largo.dev.demo", "--steps", "100", "--burst-seconds", "6", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _leftovers(workdir: Path) -> list[str]:
    """What of a stopped demo's cluster still exists on this host."""
    left = []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    left += [line.split()[0] for line in namespaces.splitlines() if line.startswith(NETNS_PREFIX)]
    nft = subprocess.run(
        [tools.locate().path("nft"), "list", "tables"], capture_output=True, text=True, check=False
    ).stdout
    left += [line for line in nft.splitlines() if line.endswith(" kube-proxy")]
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(workdir) in (entry / "cmdline").read_text():
                left.append(f"process {entry.name}")
        except OSError:
            continue  # gone meanwhile
    if workdir.exists():
        left.append(str(workdir))
    return left


def _workdir(output: str) -> Path:
    found = re.search(r"operator running \(log: (\S+)/operator\.log\)", output)
    assert found, output
    return Path(found.group(1))


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        why = "the demo's localnode nodes need root and iproute2"
        if os.environ.get("CI"):  # a CI run that skipped the demo passed without it
            pytest.fail(f"CI needs the demo: {why}", pytrace=False)
        pytest.skip(why)


def _full_run() -> None:
    demo = _demo()
    output, _ = demo.communicate(timeout=600)
    assert demo.returncode == 0, output
    assert "demo     Succeeded" in output
    assert re.search(r"burst over: \d+ answered, 0 failed", output), output
    assert output.rstrip().endswith(NOTHING_LEFT), output
    assert _leftovers(_workdir(output)) == []


def test_the_demo_after_a_ctrl_c_in_the_middle_and_twice_in_a_row() -> None:
    # Ctrl-C once it serves: it stops the cluster and leaves nothing.
    demo = _demo()
    assert demo.stdout is not None
    seen = []
    deadline = time.monotonic() + 300
    for line in demo.stdout:
        seen.append(line)
        if line.startswith("== serving") or time.monotonic() > deadline:
            break
    assert seen[-1].startswith("== serving"), "".join(seen)
    demo.send_signal(signal.SIGINT)
    rest, _ = demo.communicate(timeout=180)
    output = "".join(seen) + rest
    assert demo.returncode == 0, output
    assert output.rstrip().endswith(NOTHING_LEFT), output
    assert _leftovers(_workdir(output)) == []
    # Then twice in a row, each from a clean start.
    _full_run()
    _full_run()
