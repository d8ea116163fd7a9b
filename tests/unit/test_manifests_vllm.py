"""The vllm preset: parallel sizes per group shape, Ray only across pods, user args last, quoting.

The shell scripts are also run, by /bin/sh, against stub `ray`, `vllm`, `python3` and `sleep`
programs that record their arguments: what reaches the program is what the builder meant, and a
hostile model path or argument runs nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from largo.manifests.vllm import (
    RAY_JOIN_POLL_SECONDS,
    RAY_JOIN_TIMEOUT_SECONDS,
    RAY_PORT,
    VLLM_IMAGE,
    VllmLaunch,
    vllm_launch,
    vllm_metric_names,
)

LEADER = "llama-r0-node-0.llama.ml.svc"
MODEL = "/models/llama"


def launch(
    gpus: int = 8,
    pods: int = 1,
    member: int = 0,
    *,
    model_dir: str = MODEL,
    name: str = "llama",
    leader: str = LEADER,
    port: int = 8000,
    extra: tuple[str, ...] = (),
) -> VllmLaunch:
    return vllm_launch(
        model_dir=model_dir,
        served_model_name=name,
        gpus_per_pod=gpus,
        pods_per_replica=pods,
        member=member,
        leader_address=leader,
        port=port,
        extra_args=extra,
    )


def serve_argv(result: VllmLaunch) -> list[str]:
    """The argv after `vllm serve`, whether run directly or exec'd at the end of a shell script."""
    if result.command == ["vllm", "serve"]:
        return result.args
    assert result.command == ["/bin/sh", "-c"]
    (script,) = result.args
    words = shlex.split(script)
    start = words.index("exec")
    assert words[start + 1 : start + 3] == ["vllm", "serve"], script
    return words[start + 3 :]


def flag(argv: list[str], name: str) -> str | None:
    """The last value given to `name` (argparse keeps the last), or None."""
    values = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == name]
    return values[-1] if values else None


# --- group shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "pods", "pipeline"),
    [(1, 1, None), (8, 1, None), (8, 2, "2"), (8, 4, "4"), (4, 3, "3")],
)
def test_leader_parallel_sizes(gpus: int, pods: int, pipeline: str | None) -> None:
    result = launch(gpus, pods)
    argv = serve_argv(result)
    assert argv[0] == MODEL
    assert flag(argv, "--served-model-name") == "llama"
    assert flag(argv, "--port") == "8000"
    assert flag(argv, "--host") == "0.0.0.0"
    assert flag(argv, "--tensor-parallel-size") == str(gpus)
    assert flag(argv, "--pipeline-parallel-size") == pipeline
    multi_node = pods > 1
    assert (flag(argv, "--distributed-executor-backend") == "ray") is multi_node
    # A shell, and Ray, only when a replica spans pods.
    assert (result.command == ["/bin/sh", "-c"]) is multi_node
    assert ("ray start --head" in " ".join(result.args)) is multi_node


def test_single_pod_runs_vllm_directly() -> None:
    assert launch(8, 1) == VllmLaunch(
        command=["vllm", "serve"],
        args=[
            MODEL,
            "--served-model-name",
            "llama",
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--tensor-parallel-size",
            "8",
        ],
    )


def test_multi_pod_leader_starts_the_ray_head_then_execs_the_server() -> None:
    (script,) = launch(8, 2).args
    head, server = script.split(" && ", 1)
    assert shlex.split(head) == ["ray", "start", "--head", f"--port={RAY_PORT}"]
    assert shlex.split(server)[:3] == ["exec", "vllm", "serve"]


@pytest.mark.parametrize(("gpus", "pods"), [(8, 2), (8, 4), (1, 2)])
def test_workers_join_the_leaders_ray_head(gpus: int, pods: int) -> None:
    for member in range(1, pods):
        result = launch(gpus, pods, member)
        assert result.command == ["/bin/sh", "-c"]
        (script,) = result.args
        words = shlex.split(script)
        start = words.index("exec")
        assert words[start:] == ["exec", "ray", "start", f"--address={LEADER}:{RAY_PORT}", "--block"]
        assert "vllm" not in words
        # The wait before joining probes the same host and port.
        assert f"{LEADER} {RAY_PORT} 2>/dev/null" in script


def test_members_of_one_group_agree_and_differ_only_by_role() -> None:
    workers = {launch(8, 4, m).args[0] for m in range(1, 4)}
    assert len(workers) == 1
    assert launch(8, 4, 0).args[0] not in workers


# --- user arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("pods", [1, 2, 4])
def test_user_args_come_last_so_a_repeated_flag_wins(pods: int) -> None:
    extra = ("--max-model-len", "4096", "--port", "9000", "--enable-prefix-caching")
    argv = serve_argv(launch(8, pods, extra=extra))
    assert tuple(argv[-len(extra) :]) == extra
    assert argv.count("--port") == 2
    assert flag(argv, "--port") == "9000"


def test_user_args_do_not_reach_workers() -> None:
    (script,) = launch(8, 2, 1, extra=("--max-model-len", "4096")).args
    assert "--max-model-len" not in script


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [0, -1])
def test_no_gpus_is_refused_naming_the_field(gpus: int) -> None:
    with pytest.raises(ValueError, match=re.escape("spec.resourcesPerNode['nvidia.com/gpu']")):
        launch(gpus, 1)


@pytest.mark.parametrize("pods", [0, -2])
def test_fewer_than_one_pod_is_refused(pods: int) -> None:
    with pytest.raises(ValueError, match="nodesPerReplica"):
        launch(8, pods)


@pytest.mark.parametrize(
    ("pods", "member", "leader", "port", "message"),
    [
        (2, 2, LEADER, 8000, "member 2"),
        (2, -1, LEADER, 8000, "member -1"),
        (1, 1, LEADER, 8000, "member 1"),
        (2, 1, "", 8000, "leader_address"),
        (2, 0, "", 8000, "leader_address"),
        (1, 0, LEADER, 0, "port 0"),
        (1, 0, LEADER, 65536, "port 65536"),
    ],
)
def test_inconsistent_arguments_are_refused(
    pods: int, member: int, leader: str, port: int, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        launch(8, pods, member, leader=leader, port=port)


def test_empty_names_are_refused() -> None:
    with pytest.raises(ValueError, match="model_dir"):
        launch(model_dir="")
    with pytest.raises(ValueError, match="served_model_name"):
        launch(name="")


# --- the scripts, run ------------------------------------------------------------------------

HOSTILE = [
    "/models/my model; touch {canary}",
    "/models/$(touch {canary})",
    "/models/`touch {canary}`",
    "/models/it's && touch {canary} || true",
    '/models/"$HOME"\n touch {canary}',
]


def stub(bin_dir: Path, name: str, body: str) -> None:
    """A program named `name` on a PATH of stubs only, written in Python so it needs no other tool."""
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def recorder(bin_dir: Path, name: str, code: int = 0) -> None:
    stub(
        bin_dir,
        name,
        f"with open(os.path.join({str(bin_dir)!r}, {name!r} + '.calls'), 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"sys.exit({code})",
    )


def counter(bin_dir: Path, name: str, code: int) -> None:
    """A shell stub that only counts its calls: cheap enough to run hundreds of times."""
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\necho >> {shlex.quote(str(bin_dir / name))}.count\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def count(bin_dir: Path, name: str) -> int:
    path = bin_dir / f"{name}.count"
    return len(path.read_text().splitlines()) if path.exists() else 0


def calls(bin_dir: Path, name: str) -> list[list[str]]:
    path = bin_dir / f"{name}.calls"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_sh(result: VllmLaunch, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    assert result.command == ["/bin/sh", "-c"]
    return subprocess.run(
        ["/bin/sh", "-c", *result.args],
        env={"PATH": str(bin_dir), "HOME": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    return path


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="needs a POSIX shell")
@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_values_reach_vllm_verbatim_and_run_nothing(
    template: str, bin_dir: Path, tmp_path: Path
) -> None:
    canary = tmp_path / "pwned"
    hostile = template.format(canary=canary)
    recorder(bin_dir, "ray")
    recorder(bin_dir, "vllm")
    recorder(bin_dir, "touch")
    result = launch(8, 2, model_dir=hostile, name=hostile, extra=(hostile, "--x=$(touch y)"))

    done = run_sh(result, bin_dir)

    assert done.returncode == 0, done.stderr
    assert not canary.exists()
    assert calls(bin_dir, "touch") == []
    assert calls(bin_dir, "ray") == [["start", "--head", f"--port={RAY_PORT}"]]
    (argv,) = calls(bin_dir, "vllm")
    assert argv[:2] == ["serve", hostile]
    assert flag(argv, "--served-model-name") == hostile
    assert argv[-2:] == [hostile, "--x=$(touch y)"]
    assert argv == ["serve", *serve_argv(result)]


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="needs a POSIX shell")
def test_leader_does_not_serve_when_the_ray_head_fails(bin_dir: Path) -> None:
    recorder(bin_dir, "ray", code=1)
    recorder(bin_dir, "vllm")
    done = run_sh(launch(8, 2), bin_dir)
    assert done.returncode == 1
    assert calls(bin_dir, "vllm") == []


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="needs a POSIX shell")
@pytest.mark.parametrize("leader", [LEADER, "odd host; touch pwned", "$(touch pwned)"])
def test_worker_waits_for_the_head_then_joins(leader: str, bin_dir: Path) -> None:
    # The probe fails twice (the head is not up yet), then succeeds.
    stub(
        bin_dir,
        "python3",
        f"log = os.path.join({str(bin_dir)!r}, 'python3.calls')\n"
        "with open(log, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "with open(log) as f:\n"
        "    sys.exit(0 if len(f.readlines()) > 2 else 1)",
    )
    recorder(bin_dir, "sleep")
    recorder(bin_dir, "ray")
    recorder(bin_dir, "touch")

    done = run_sh(launch(8, 2, 1, leader=leader), bin_dir)

    assert done.returncode == 0, done.stderr
    probes = calls(bin_dir, "python3")
    assert len(probes) == 3
    assert all(p[0] == "-c" and p[2:] == [leader, str(RAY_PORT)] for p in probes)
    assert calls(bin_dir, "sleep") == [[str(RAY_JOIN_POLL_SECONDS)]] * 2
    assert calls(bin_dir, "ray") == [["start", f"--address={leader}:{RAY_PORT}", "--block"]]
    assert calls(bin_dir, "touch") == []


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="needs a POSIX shell")
def test_worker_gives_up_when_the_head_never_comes(bin_dir: Path) -> None:
    counter(bin_dir, "python3", code=1)
    counter(bin_dir, "sleep", code=0)  # returns at once: the bounded wait is counted, not timed
    counter(bin_dir, "ray", code=0)

    done = run_sh(launch(8, 2, 1), bin_dir)

    assert done.returncode == 1
    assert count(bin_dir, "ray") == 0
    polls = RAY_JOIN_TIMEOUT_SECONDS // RAY_JOIN_POLL_SECONDS
    assert count(bin_dir, "sleep") == polls
    assert count(bin_dir, "python3") == polls + 1
    assert f"no Ray head at {LEADER}:{RAY_PORT}" in done.stderr


# --- constants -------------------------------------------------------------------------------


def test_image_is_pinned() -> None:
    repository, _, tag = VLLM_IMAGE.partition(":")
    assert repository == "vllm/vllm-openai"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag)


def test_metric_names() -> None:
    assert vllm_metric_names() == {
        "inFlight": "vllm:num_requests_running",
        "waiting": "vllm:num_requests_waiting",
        "requestsTotal": "vllm:request_success_total",
    }
