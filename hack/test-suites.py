"""`make test`: the test suites in three groups that share nothing, run side by side, one pytest each.

- localnode: every test that runs a localnode cluster (its kube-proxy holds a host-wide lock, so only
  one such cluster runs at a time): e2e, make demo, and the local cluster's own tests;
- cluster: the other integration tests, on their session's kwok cluster and operator;
- processes: the runtime tests (torch.distributed gangs) and the unit tests.

Each group's output goes to its own log, printed whole when the group ends; the exit status is the
first failing group's (pytest's 5 when a group collected nothing counts as failing). Arguments are
passed to every pytest; a --junitxml=PATH gets one report per group, merged into PATH at the end.
Stopped itself (SIGTERM, SIGINT: a CI's cancel, `timeout make test`), it stops the groups as Ctrl-C
would, so that their fixtures take their clusters down, then kills what is left: an orphaned group
kept its local cluster's lock, and the next run failed on it.

    python hack/test-suites.py [pytest arguments...]
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
LOCAL_CLUSTER = "integration/test_local_cluster.py"
GROUPS = {
    # make demo first: e2e's cluster (a fixture of a directory, not a package) lives to the session's end.
    "localnode": ["demo", "e2e", LOCAL_CLUSTER],
    "cluster": ["integration", f"--ignore={TESTS / LOCAL_CLUSTER}"],
    "processes": ["runtime", "unit"],
}
# A test that hangs fails after this (pytest-timeout prints where each thread was), instead of holding
# its group until CI's own limit: the longest test takes ~4 minutes (make demo, twice, with a Ctrl-C).
TEST_TIMEOUT_SECONDS = 1800
# How long a stopped group may take to tear its fixtures down before it is killed.
TEARDOWN_SECONDS = 60


class StoppedError(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, _frame: object) -> None:
    raise StoppedError(signum)


def main(arguments: list[str]) -> int:
    junit = next((a.split("=", 1)[1] for a in arguments if a.startswith("--junitxml=")), None)
    passed = [a for a in arguments if not a.startswith("--junitxml=")]
    logs = Path(tempfile.mkdtemp(prefix="largo-tests-"))
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    codes: dict[str, int] = {}
    try:
        _start(running, passed, junit, logs)
        _wait(dict(running), codes, logs)
    except StoppedError as stopped:
        left = {name: process for name, (process, _) in running.items() if process.poll() is None}
        print(f"\n===== {stopped}: stopping {', '.join(left)} =====", flush=True)
        _stop_groups(list(left.values()))
        return 128 + stopped.signum
    if junit:
        merge([Path(f"{junit}.{name}") for name in GROUPS], Path(junit))
    failing = [name for name, code in codes.items() if code != 0]
    print(f"\n===== groups: {', '.join(f'{n} exit {c}' for n, c in codes.items())} =====")
    return codes[failing[0]] if failing else 0


def _start(
    running: dict[str, tuple[subprocess.Popen[bytes], float]],
    passed: list[str],
    junit: str | None,
    logs: Path,
) -> None:
    for name, paths in GROUPS.items():
        command = [sys.executable, "-m", "pytest"]
        command += [p if p.startswith("--") else str(TESTS / p) for p in paths]
        command += passed + ([f"--junitxml={junit}.{name}"] if junit else [])
        if not any(a.startswith("--timeout") for a in passed):
            command.append(f"--timeout={TEST_TIMEOUT_SECONDS}")
        log = (logs / f"{name}.log").open("wb")
        # A session of its own: the signal that stops this reaches each group only as sent below.
        group = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        running[name] = (group, time.monotonic())


def _stop_groups(processes: list[subprocess.Popen[bytes]]) -> None:
    """Ctrl-C to each group (pytest then runs its fixtures' teardown), then SIGKILL to what is left."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
    deadline = time.monotonic() + TEARDOWN_SECONDS
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait(
    pending: dict[str, tuple[subprocess.Popen[bytes], float]], codes: dict[str, int], logs: Path
) -> None:
    while pending:
        for name, (process, started) in list(pending.items()):
            if process.poll() is not None:
                codes[name] = process.returncode
                minutes = (time.monotonic() - started) / 60
                print(f"\n===== {name}: exit {process.returncode} after {minutes:.1f} min =====", flush=True)
                sys.stdout.write((logs / f"{name}.log").read_text(errors="replace"))
                sys.stdout.flush()
                del pending[name]
        time.sleep(1)


def merge(parts: list[Path], into: Path) -> None:
    """One <testsuites> of every group's <testsuite>s."""
    merged = ElementTree.Element("testsuites")
    for part in parts:
        if not part.is_file():
            continue
        root = ElementTree.parse(part).getroot()
        merged.extend([root] if root.tag == "testsuite" else list(root))
        part.unlink()
    ElementTree.ElementTree(merged).write(into, encoding="utf-8", xml_declaration=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
