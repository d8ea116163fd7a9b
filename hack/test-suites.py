"""`make test`: the test suites in three groups that share nothing, run side by side, one pytest each.

- localnode: every test that runs a localnode cluster (its kube-proxy holds a host-wide lock, so only
  one such cluster runs at a time): e2e, make demo, and the local cluster's own tests;
- cluster: the other integration tests, on their session's kwok cluster and operator;
- processes: the runtime tests (torch.distributed gangs) and the unit tests.

Each group's output goes to its own log, printed whole when the group ends; the exit status is the
first failing group's (pytest's 5 when a group collected nothing counts as failing). Arguments are
passed to every pytest; a --junitxml=PATH gets one report per group, merged into PATH at the end.

    python hack/test-suites.py [pytest arguments...]
"""

from __future__ import annotations

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


def main(arguments: list[str]) -> int:
    junit = next((a.split("=", 1)[1] for a in arguments if a.startswith("--junitxml=")), None)
    passed = [a for a in arguments if not a.startswith("--junitxml=")]
    logs = Path(tempfile.mkdtemp(prefix="largo-tests-"))
    running = {}
    for name, paths in GROUPS.items():
        command = [sys.executable, "-m", "pytest"]
        command += [p if p.startswith("--") else str(TESTS / p) for p in paths]
        command += passed + ([f"--junitxml={junit}.{name}"] if junit else [])
        if not any(a.startswith("--timeout") for a in passed):
            command.append(f"--timeout={TEST_TIMEOUT_SECONDS}")
        log = (logs / f"{name}.log").open("wb")
        running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), time.monotonic())
    codes = {}
    pending = dict(running)
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
    if junit:
        merge([Path(f"{junit}.{name}") for name in GROUPS], Path(junit))
    failing = [name for name, code in codes.items() if code != 0]
    print(f"\n===== groups: {', '.join(f'{n} exit {c}' for n, c in codes.items())} =====")
    return codes[failing[0]] if failing else 0


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
