"""The operator's entry point loads neither the development tooling nor its dependencies."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from largo.cli import main
import largo.controllers.handlers
try:
    main(["operator", "--help"])
except SystemExit as done:
    assert done.code == 0, done.code
loaded = sorted(m for m in sys.modules if m.startswith("largo.dev") or m.split(".")[0] == "cryptography")
print("loaded:" + ",".join(loaded))
"""


def test_largo_operator_imports_no_dev_tooling() -> None:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert "usage: largo operator" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "loaded:"


def test_largo_dev_is_still_there_for_developers() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "largo", "dev", "--help"], capture_output=True, text=True, check=True
    )
    assert "{up,down,status," in run.stdout  # the dev subcommands are listed


# As installed without the dev extra (the operator's image): cryptography cannot be imported.
WITHOUT_DEV = """
import sys
sys.modules["cryptography"] = None
from largo.cli import main
for argv in (["top", "--help"], ["dev", "up"]):
    try:
        print("exit", main(argv))
    except SystemExit as done:
        print("exit", done.code)
"""


def test_largo_top_runs_without_the_dev_extra_and_dev_commands_say_what_they_need() -> None:
    """`kubectl exec ... largo top` in the operator's image crashed importing the dev tooling."""
    run = subprocess.run([sys.executable, "-c", WITHOUT_DEV], capture_output=True, text=True, check=True)
    assert "usage: largo top" in run.stdout
    lines = run.stdout.strip().splitlines()
    assert lines[-3] == "exit 0"  # top --help
    assert lines[-2].startswith("largo dev: needs largo's dev extra (pip install 'largo[dev]')")
    assert lines[-1] == "exit 2"


def test_the_health_checks_listen_on_the_pod_ip_s_family() -> None:
    """kopf serves them on one socket, IPv6-only for ``::``: the kubelet probes the pod's IP."""
    from largo.controllers.main import liveness_endpoint

    url = "http://0.0.0.0:8080/healthz"
    assert liveness_endpoint(url, "fd00:10:244::7") == "http://[::]:8080/healthz"
    assert liveness_endpoint(url, "10.244.0.7") == url
    assert liveness_endpoint(url, None) == url
    assert liveness_endpoint("http://127.0.0.1:8080/healthz", "fd00::7") == "http://127.0.0.1:8080/healthz"
    assert liveness_endpoint(None, "fd00::7") is None
