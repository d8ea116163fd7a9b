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
