"""The trainer runtime with real torch.distributed process groups (gloo, CPU), launched by torchrun
with exactly the environment the TrainJob builder renders (the master address mapped to loopback)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from damage import flip_a_byte_of_the_weights
from gangs import STEPS, TRAIN_ARGS, Gang, scrape
from largo.dev.cluster import free_port, wait_for
from largo.runtime import checkpoint
from largo.runtime.metrics import TrainMetrics
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.runtime


@pytest.fixture
def gang(tmp_path: Path) -> Iterator[Gang]:
    running = Gang(tmp_path, tmp_path / "checkpoints")
    yield running
    running.kill()


def test_contract_env_forms_a_gloo_process_group_and_the_loss_goes_down(gang: Gang) -> None:
    gang.start()
    assert gang.wait() == [0, 0], gang.log(0) + gang.log(1)
    losses = gang.losses()
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sum(losses[s] for s in range(51, 61)) / 10 < 0.8 * sum(losses[s] for s in range(1, 11)) / 10
    assert [step for step, _ in checkpoint.complete(gang.checkpoints)] == [60, 40, 20]


def test_a_killed_rank_restarts_from_the_checkpoint_and_matches_an_uninterrupted_run(
    tmp_path: Path, gang: Gang
) -> None:
    # Steps take milliseconds: the reference runs long enough that the kill below, however late it
    # lands, leaves steps to resume and compare.
    total = 200
    reference = Gang(tmp_path / "reference", tmp_path / "reference-checkpoints", steps=total)
    reference.workdir.mkdir()
    reference.start()
    assert reference.wait() == [0, 0], reference.log(0)
    expected = reference.losses()

    # The first attempt cannot finish before the kill reaches it, however slow the machine: it is
    # given more steps than it will live for (the batches and the optimizer do not depend on the total).
    gang.steps = 100_000
    gang.start()
    wait_for(
        lambda: any(step >= 20 for step, _ in checkpoint.complete(gang.checkpoints)), 180, "a checkpoint"
    )
    wait_for(lambda: max(gang.losses(), default=0) >= 25, 180, "training past the checkpoint")
    resumed_from = gang.kill_a_rank(1)  # one rank dies, the gang is torn down
    assert resumed_from < total, "the kill came too late to leave steps to resume"
    gang.steps = total
    gang.start()
    assert gang.wait() == [0, 0], gang.log(0)
    assert f"resumed from checkpoint of step {resumed_from}" in gang.log(0)
    after = gang.losses()
    assert min(after) == resumed_from + 1
    assert max(after) == total
    for step in range(resumed_from + 1, total + 1):
        assert after[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


def test_every_rank_resumes_from_rank_0_s_checkpoint_or_the_gang_restarts(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    first = Gang(tmp_path / "first", checkpoints, steps=40)
    first.workdir.mkdir()
    first.start()
    assert first.wait() == [0, 0], first.log(0)
    assert [step for step, _ in checkpoint.complete(checkpoints)] == [40, 20]
    # Node 1 sees the directory as it was before step 40 was written (a network filesystem's moment).
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(checkpoint.checkpoint_path(checkpoints, 20), stale)
    second = Gang(tmp_path / "second", checkpoints, steps=60, node_checkpoints=[checkpoints, stale])
    second.workdir.mkdir()
    second.start()
    # Resuming from two steps would train on with the ranks' weights mixed, and no error said.
    assert second.wait() == [1, 1], second.log(0)
    assert "cannot read the checkpoint of step 40, rank 0's choice" in second.log(1)
    assert "resumed from checkpoint" not in second.log(1)
    assert "another rank cannot read the checkpoint of step 40; the gang restarts" in second.log(0)
    # The directory whole again (the restart): every rank resumes from step 40.
    second.node_checkpoints = None
    second.start()
    assert second.wait() == [0, 0], second.log(1)
    for node in (0, 1):
        assert second.log(node).count("resumed from checkpoint of step 40") == 2, second.log(node)


def test_sigterm_writes_a_checkpoint_before_exit(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LARGO_CHECKPOINT_DIR": str(checkpoints)}
    out = (tmp_path / "train.log").open("wb")
    command = [sys.executable, "-m", "largo.runtime.train", "--steps", "100000", "--checkpoint-every", "1000"]
    process = subprocess.Popen([*command, *TRAIN_ARGS], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (tmp_path / "train.log").read_text().count('"step"') >= 7, 120, "some steps")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143
    finally:
        process.kill()
    steps = [step for step, _ in checkpoint.complete(checkpoints)]
    assert len(steps) == 1
    assert steps[0] >= 7
    assert steps[0] % 1000 != 0  # written because of the signal, not the schedule
    assert not list(checkpoints.glob("*.partial"))


def test_a_checkpoint_of_another_model_is_not_resumed_from(tmp_path: Path) -> None:
    """The job's args changed between attempts (--depth 2 -> 1): resuming would have taken the first
    block's weights without a word; the trainer refuses, saying how the models differ."""
    checkpoints = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LARGO_CHECKPOINT_DIR": str(checkpoints)}
    command = [sys.executable, "-m", "largo.runtime.train", *TRAIN_ARGS, "--checkpoint-every", "5"]
    first = subprocess.run([*command, "--steps", "5"], env=env, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    changed = subprocess.run(
        [*command, "--steps", "10", "--depth", "1"], env=env, capture_output=True, text=True, check=False
    )
    assert changed.returncode == 2
    assert "the checkpoint of step 5" in changed.stderr
    assert "is of another model: depth 2 (now 1)" in changed.stderr
    assert [step for step, _ in checkpoint.complete(checkpoints)] == [5]  # nothing written over it


def test_resuming_from_another_job_s_checkpoint_is_said(tmp_path: Path) -> None:
    """A new job on a finished one's checkpoint directory continues its training: by design, told."""
    checkpoints = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LARGO_CHECKPOINT_DIR": str(checkpoints)}
    env |= {"LARGO_JOB_NAMESPACE": "research", "LARGO_JOB_NAME": "pretrain"}
    command = [sys.executable, "-m", "largo.runtime.train", *TRAIN_ARGS, "--checkpoint-every", "5"]
    first = subprocess.run([*command, "--steps", "5"], env=env, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*command, "--steps", "6"], env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert "resumed from checkpoint of step 5" in again.stderr
    assert "was written by TrainJob" not in again.stderr  # its own
    env["LARGO_JOB_NAME"] = "pretrain-longer"
    other = subprocess.run([*command, "--steps", "7"], env=env, capture_output=True, text=True, check=False)
    assert other.returncode == 0, other.stderr
    assert "the checkpoint of step 6 was written by TrainJob research/pretrain" in other.stderr


@pytest.mark.parametrize("damage", ["truncated", "a flipped bit"])
def test_a_damaged_checkpoint_is_skipped_on_resume(tmp_path: Path, damage: str) -> None:
    checkpoints = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LARGO_CHECKPOINT_DIR": str(checkpoints)}
    command = [sys.executable, "-m", "largo.runtime.train", *TRAIN_ARGS, "--checkpoint-every", "10"]
    first = subprocess.run([*command, "--steps", "30"], env=env, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    newest = checkpoint.checkpoint_path(checkpoints, 30)
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        said = "cannot be read"
    else:  # still a whole archive torch.load reads without a word: only the records' checksums tell
        said = f"damaged: record {flip_a_byte_of_the_weights(newest)} does not match its checksum"

    resumed = subprocess.run(
        [*command, "--steps", "40"], env=env, capture_output=True, text=True, check=False
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping checkpoint {newest}: {said}" in resumed.stderr
    assert "resumed from checkpoint of step 20" in resumed.stderr
    steps = [json.loads(line)["step"] for line in resumed.stdout.splitlines() if line.startswith("{")]
    assert steps[0] == 21


def test_checkpoints_are_pruned_to_the_newest(tmp_path: Path) -> None:
    state: dict[str, Any] = {"weights": [1, 2, 3]}
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, state)
    interrupted = tmp_path / "step-000000050.pt.1234-0a1b2c3d.partial"
    interrupted.write_bytes(b"interrupted")
    old = time.time() - checkpoint.STALE_PARTIAL_SECONDS - 60
    os.utime(interrupted, (old, old))
    in_flight = tmp_path / "step-000000060.pt.5678-4e5f6a7b.partial"  # another writer's, being written
    in_flight.write_bytes(b"being written")
    removed = checkpoint.prune(tmp_path, keep=2)
    assert sorted(path.name for path in removed) == [
        "step-000000010.pt",
        "step-000000020.pt",
        interrupted.name,
    ]
    assert in_flight.exists()
    in_flight.unlink()
    assert [step for step, _ in checkpoint.complete(tmp_path)] == [40, 30]
    loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None
    assert loaded["step"] == 40
    assert loaded["weights"] == [1, 2, 3]
    assert checkpoint.latest_checkpoint(tmp_path) == checkpoint.checkpoint_path(tmp_path, 40)
    # A flipped bit in the newest, which torch.load reads without a word: users' scripts get the one before.
    newest = checkpoint.save(tmp_path, 40, {"weights": torch.zeros(1000)})
    flip_a_byte_of_the_weights(newest)
    assert checkpoint.latest_checkpoint(tmp_path) == checkpoint.checkpoint_path(tmp_path, 30)


def test_pruning_keeps_the_checkpoint_just_written_and_at_least_one(tmp_path: Path) -> None:
    """A newer-numbered damaged file (which resuming skipped) does not push out the checkpoint just
    written; ``keep`` 0 keeps one."""
    state: dict[str, Any] = {"weights": [1]}
    for step in (100, 110):
        checkpoint.save(tmp_path, step, state)
    checkpoint.checkpoint_path(tmp_path, 200).write_bytes(b"damaged")
    checkpoint.prune(tmp_path, keep=1, written=110)
    assert [step for step, _ in checkpoint.complete(tmp_path)] == [200, 110]
    checkpoint.prune(tmp_path, keep=0)
    assert [step for step, _ in checkpoint.complete(tmp_path)] == [200]


def test_pruning_goes_on_past_a_file_it_cannot_remove(tmp_path: Path) -> None:
    """One that cannot go (here a directory under a checkpoint's name) kept every older checkpoint and
    stale temporary file on the disk, at every checkpoint; the failure is raised once the rest are gone."""
    for step in (1, 3, 4):
        checkpoint.save(tmp_path, step, {"weights": [step]})
    checkpoint.checkpoint_path(tmp_path, 2).mkdir()
    stale = tmp_path / "step-000000005.pt.1-0a1b2c3d.partial"
    stale.write_bytes(b"interrupted")
    old = time.time() - checkpoint.STALE_PARTIAL_SECONDS - 60
    os.utime(stale, (old, old))
    with pytest.raises(IsADirectoryError):
        checkpoint.prune(tmp_path, keep=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "step-000000002.pt",
        "step-000000003.pt",
        "step-000000004.pt",
    ]


def test_a_step_past_nine_digits_is_listed_resumed_and_pruned(tmp_path: Path) -> None:
    for step in (999_999_999, 1_000_000_000):
        checkpoint.save(tmp_path, step, {"weights": [step]})
    assert [step for step, _ in checkpoint.complete(tmp_path)] == [1_000_000_000, 999_999_999]
    loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None
    assert loaded["step"] == 1_000_000_000
    checkpoint.prune(tmp_path, keep=1)
    assert [step for step, _ in checkpoint.complete(tmp_path)] == [1_000_000_000]


def test_a_broken_link_under_a_checkpoint_s_name_is_skipped(tmp_path: Path) -> None:
    """It stays after every listing: taken for a file pruned as it was read, it made every resume list
    again three times and fail, with a good older checkpoint there."""
    checkpoint.save(tmp_path, 100, {"weights": [100]})
    checkpoint.checkpoint_path(tmp_path, 200).symlink_to(tmp_path / "gone" / "step-000000200.pt")
    loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None
    assert loaded["step"] == 100
    assert checkpoint.latest_checkpoint(tmp_path) == checkpoint.checkpoint_path(tmp_path, 100)


@pytest.mark.parametrize(
    "refusal",
    [
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 600000000 bytes",
        "unable to mmap 600001641 bytes from file <step-000000002.pt>: Cannot allocate memory (12)",
    ],
)
def test_a_checkpoint_too_big_for_memory_is_not_skipped_for_an_older_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    """torch's allocator and its file mapping say so as RuntimeError (under a hard memory cap): taken for
    damage, the newest checkpoint was skipped and an older one resumed or served."""
    for step in (1, 2):
        checkpoint.save(tmp_path, step, {"weights": [step]})
    load = torch.load

    def short_of_memory(path: Path, *args: Any, **kwargs: Any) -> Any:
        if Path(path) == checkpoint.checkpoint_path(tmp_path, 2):
            raise RuntimeError(refusal)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", short_of_memory)
    with pytest.raises(MemoryError, match="does not fit"):
        checkpoint.load_latest(tmp_path)
    assert not checkpoint.out_of_memory(RuntimeError("PytorchStreamReader failed reading zip archive"))


def test_the_background_writer_writes_prunes_and_keeps_one_write_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_save = checkpoint.save

    def held_save(directory: Path, step: int, state: dict[str, Any]) -> Path:
        if step == 10:
            assert release.wait(60)
        return real_save(directory, step, state)

    monkeypatch.setattr(checkpoint, "save", held_save)
    writer = checkpoint.BackgroundWriter(tmp_path, keep=1)
    writer.submit(10, {"weights": [1]})  # returns while the write is held
    assert writer.written is None
    second = threading.Thread(target=writer.submit, args=(20, {"weights": [2]}))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive(), "a second write must wait for the one in flight"
    release.set()
    second.join(timeout=60)
    writer.close()
    assert writer.written is not None
    assert writer.written[0] == 20
    assert [step for step, _ in checkpoint.complete(tmp_path)] == [20]  # pruned to keep=1


def test_a_failed_background_write_is_raised_not_lost(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the checkpoints should go")
    writer = checkpoint.BackgroundWriter(blocker, keep=3)
    writer.submit(10, {"weights": [1]})
    with pytest.raises(FileExistsError):
        writer.close()
    assert writer.written is None


def test_rank_zero_serves_prometheus_metrics(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "largo.runtime.train", "--steps", "100000", *TRAIN_ARGS]
    out = (tmp_path / "train.log").open("wb")
    process = subprocess.Popen(
        [*command, "--metrics-port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
    )
    try:
        samples: dict[str, float] = {}

        def scraped() -> bool:
            samples.clear()
            samples.update(scrape(port) or {})
            return samples.get("largo_train_step", 0) >= 5

        wait_for(scraped, 120, "metrics with a few steps")
        assert samples["largo_train_loss"] > 0
        assert samples["largo_train_tokens_per_second"] > 0
        assert samples["largo_train_step_seconds_count"] >= 5
        assert samples["largo_train_collective_seconds"] == 0  # a single process has no collectives
        for kind in ("data", "tensor", "pipeline"):
            assert samples[f"largo_train_communication_bytes_per_step:{kind}"] == 0
            assert samples[f"largo_train_communication_seconds_per_step:{kind}"] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_fsdp_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    gang = Gang(tmp_path, tmp_path / "checkpoints", steps=30, extra=["--fsdp"])
    try:
        gang.start()
        assert gang.wait() == [0, 0], gang.log(0) + gang.log(1)
        assert [step for step, _ in checkpoint.complete(gang.checkpoints)] == [30, 20]
        gang.steps = 40
        gang.start()
        assert gang.wait() == [0, 0], gang.log(0)
        assert "resumed from checkpoint of step 30" in gang.log(0)
        assert min(gang.losses()) == 31
    finally:
        gang.kill()


def test_a_write_that_fails_leaves_no_partial_file(tmp_path: Path) -> None:
    unpicklable = {"weights": [1], "hook": lambda: None}
    with pytest.raises(Exception, match="pickle"):
        checkpoint.save(tmp_path, 10, unpicklable)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.EIO])
def test_a_filesystem_that_cannot_sync_a_directory_still_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Some FUSE and network filesystems refuse fsync on a directory (EINVAL): every save failed after
    its rename had succeeded. A real I/O error still fails the save."""
    real_fsync = os.fsync

    def refuses_directories(descriptor: int) -> None:
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(descriptor)

    monkeypatch.setattr(checkpoint.os, "fsync", refuses_directories)
    if code == errno.EIO:
        with pytest.raises(OSError, match=os.strerror(code)):
            checkpoint.save(tmp_path / "new", 10, {"weights": [1]})
        return
    checkpoint.save(tmp_path / "new", 10, {"weights": [1]})
    assert [step for step, _ in checkpoint.complete(tmp_path / "new")] == [10]


def test_a_pruning_error_after_a_durable_write_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(directory: Path, keep: int, written: int | None = None) -> list[Path]:
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(checkpoint, "prune", refused)
    writer = checkpoint.BackgroundWriter(tmp_path, keep=1)
    writer.submit(10, {"weights": [1]})
    writer.close()
    assert writer.written is not None
    assert writer.written[0] == 10
    assert [step for step, _ in checkpoint.complete(tmp_path)] == [10]
    assert "checkpoint of step 10 written, but pruning" in caplog.text


def test_a_v1_checkpoint_without_its_entries_is_refused_not_raised_as_a_key_error(tmp_path: Path) -> None:
    path = checkpoint.checkpoint_path(tmp_path, 5)
    torch.save({"format": checkpoint.FORMAT_V1, "step": 5}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable"):
        checkpoint.read(path, 5)
    assert checkpoint.load_latest(tmp_path) is None  # skipped, as any unreadable one


def test_a_checkpoint_the_storage_fails_to_give_is_not_skipped_for_an_older_one_or_for_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A network filesystem's moment (EIO, a timeout) says nothing of the checkpoint: resuming from an
    older one, or from step 0, would silently undo training. The gang restarts instead."""
    import errno

    from largo.runtime import train

    checkpoints = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LARGO_CHECKPOINT_DIR": str(checkpoints)}
    command = [sys.executable, "-m", "largo.runtime.train", *TRAIN_ARGS, "--checkpoint-every", "10"]
    first = subprocess.run([*command, "--steps", "20"], env=env, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    written = sorted(path.name for path in checkpoints.iterdir())

    def storage_failed(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint.torch, "load", storage_failed)
    with pytest.raises(checkpoint.CheckpointStorageError, match="could not be read from its storage"):
        checkpoint.load_latest(checkpoints)
    monkeypatch.setenv("LARGO_CHECKPOINT_DIR", str(checkpoints))
    assert train.main([*TRAIN_ARGS, "--steps", "30", "--checkpoint-every", "10"]) == 1
    assert "the gang restarts" in caplog.text
    assert sorted(path.name for path in checkpoints.iterdir()) == written  # nothing trained from 0


def test_a_directory_the_storage_fails_to_list_is_its_failure_not_an_empty_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from largo.runtime import engine_host

    checkpoint.save(tmp_path, 10, {"weights": [10]})

    def stale(directory: Path) -> Any:
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(checkpoint, "complete", stale)
    with pytest.raises(checkpoint.CheckpointStorageError):
        checkpoint.load_latest(tmp_path)
    # The server's loading says so as the storage's failure (its process exits, to be restarted),
    # whatever raised it: a pinned step's file is looked for with a stat that fails the same way.
    monkeypatch.setattr(engine_host, "load_stage", lambda *args: stale(tmp_path))
    loading = engine_host.Loading()
    loading.load(argparse.Namespace(), 0, 10)
    with pytest.raises(engine_host.StorageError):
        loading.held()


def test_a_checkpoint_pruned_between_listing_and_reading_makes_the_listing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer wrote step 30 and pruned step 20 while a reader had listed 20 as the newest: it
    takes 30, not the older 10 (which a small --keep may prune next)."""
    for step in (10, 20):
        checkpoint.save(tmp_path, step, {"weights": [step]})
    read = checkpoint.damaged_record

    def meanwhile(path: Path) -> str | None:
        if path == checkpoint.checkpoint_path(tmp_path, 20) and path.exists():
            checkpoint.save(tmp_path, 30, {"weights": [30]})
            path.unlink()
        return read(path)

    monkeypatch.setattr(checkpoint, "damaged_record", meanwhile)
    loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None
    assert loaded["step"] == 30


def test_a_learning_rate_changed_between_attempts_is_used_not_the_checkpoint_s(tmp_path: Path) -> None:
    """A restore brings the checkpoint's optimizer groups back, their learning rate with them: a job's
    edited --lr would otherwise never reach its next attempt."""
    checkpoints = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LARGO_CHECKPOINT_DIR": str(checkpoints)}
    command = [sys.executable, "-m", "largo.runtime.train", *TRAIN_ARGS, "--checkpoint-every", "5"]
    first = subprocess.run([*command, "--steps", "5"], env=env, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    edited = [*command, "--steps", "6", "--lr", "0.0005"]
    second = subprocess.run(edited, env=env, capture_output=True, text=True, check=False)
    assert second.returncode == 0, second.stderr
    assert "learning rate 0.0005 from the arguments replaces the checkpoint's 0.003" in second.stderr
    resumed = checkpoint.load_latest(checkpoints)
    assert resumed is not None
    assert resumed["step"] == 6
    assert {group["lr"] for group in resumed["optimizer"]["param_groups"]} == {0.0005}


def test_two_writers_saving_one_step_at_once_each_rename_a_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's script that saves from every rank: two writes of one step in flight at once never share
    a file (one truncating the other's, then renaming it from under it), so both succeed and the file
    under the final name is whole."""
    both_written = threading.Barrier(2, timeout=60)
    save = torch.save

    def save_then_wait(obj: Any, out: Any) -> None:
        save(obj, out)
        both_written.wait()  # both writes are in flight before either is renamed

    monkeypatch.setattr(checkpoint.torch, "save", save_then_wait)
    errors: list[BaseException] = []

    def write(value: int) -> None:
        try:
            checkpoint.save(tmp_path, 7, {"weights": torch.full((1000,), float(value))})
        except BaseException as error:  # told by the assertion below
            errors.append(error)

    writers = [threading.Thread(target=write, args=(value,)) for value in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert errors == []
    loaded = checkpoint.read(checkpoint.checkpoint_path(tmp_path, 7), 7)
    assert float(loaded["weights"][0]) in (1.0, 2.0)
    assert torch.equal(loaded["weights"], torch.full((1000,), loaded["weights"][0].item()))
    assert [path.name for path in tmp_path.iterdir()] == ["step-000000007.pt"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--heads", "5"], "--heads 5 must divide --width"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
        (["--data", "{tmp}/no-such-dir"], "no-such-dir is neither a file nor a directory"),
        (["--data", "{tmp}/short.txt"], "fewer than the 34 a window needs"),
        (["--data", "{tmp}/empty"], "no training text found"),
    ],
)
def test_what_no_restart_can_mend_exits_2(tmp_path: Path, extra: list[str], says: str) -> None:
    """Exit 2 is the reference's "bad arguments" (for failurePolicy.permanentExitCodes); these crashed
    with exit 1, and each restart held the gang's GPUs again for the same failure."""
    (tmp_path / "short.txt").write_text("too short for a window")
    (tmp_path / "empty").mkdir()
    extra = [part.format(tmp=tmp_path) for part in extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LARGO_CHECKPOINT_DIR", None)
    command = [sys.executable, "-m", "largo.runtime.train", *TRAIN_ARGS, "--steps", "2", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr


def test_a_cut_of_the_text_is_said(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (corpus / name).write_text(name * 1000)  # 5,000 bytes each
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LARGO_CHECKPOINT_DIR", None)
    command = [sys.executable, "-m", "largo.runtime.train", *TRAIN_ARGS, "--steps", "1"]
    cut = subprocess.run(
        [*command, "--data", str(corpus), "--data-bytes", "6000"], env=env, capture_output=True, text=True
    )
    assert cut.returncode == 0, cut.stderr
    assert "training on the first 6000 bytes of the text (--data-bytes): 9000 bytes left out" in cut.stderr
    whole = subprocess.run([*command, "--data", str(corpus)], env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    assert "left out" not in whole.stderr


def test_a_run_resumed_with_nothing_left_to_train_reports_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new job on a finished one's directory trains nothing: its report still names the checkpoint,
    which a model server following the job waits for."""
    from largo.runtime import train

    reports: list[dict[str, Any]] = []

    class Captured:
        def __init__(self, interval: float) -> None:
            pass

        def report(self, fields: dict[str, Any]) -> None:
            reports.append(fields)

        def close(self) -> None:
            pass

    monkeypatch.setattr(train, "ProgressReporter", Captured)
    # A registry of its own: another test's run in this process registered the trainer's series.
    monkeypatch.setattr(train.metrics, "TrainMetrics", lambda: TrainMetrics(CollectorRegistry()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    checkpoints = tmp_path / "checkpoints"
    args = [*TRAIN_ARGS, "--steps", "4", "--checkpoint-every", "4", "--checkpoint-dir", str(checkpoints)]
    first = subprocess.run(  # the finished job (a process of its own: its metrics are registered once)
        [sys.executable, "-m", "largo.runtime.train", *args], capture_output=True, text=True, check=False
    )
    assert first.returncode == 0, first.stderr
    assert train.main(args) == 0
    (report,) = reports
    assert (report["step"], report["checkpointStep"], report["loss"]) == (4, 4, None)
    # With steps left, the reports name the checkpoint resumed from until the run writes one: after a
    # restart the work at risk (LargoNoCheckpoint, status.progress) is still known.
    reports.clear()
    longer = [*TRAIN_ARGS, "--steps", "6", "--checkpoint-every", "100", "--checkpoint-dir", str(checkpoints)]
    assert train.main(longer) == 0
    assert [(r["step"], r["checkpointStep"]) for r in reports] == [(5, 4), (6, 4), (6, 6)]


@pytest.mark.parametrize("flag", ["--log-every", "--stop-check-every"])
def test_a_zero_period_is_a_bad_argument_not_a_crash(flag: str) -> None:
    """A division by zero at step 1 exited 1, which the failure policy retries; bad arguments exit 2."""
    from largo.runtime.train import bad_arguments, parse_args

    assert bad_arguments(parse_args([flag, "0"])) == f"{flag} must be at least 1, not 0"
    refused = bad_arguments(parse_args(["--communication-sample-every", "-1"]))
    assert refused == "--communication-sample-every must be at least 0, not -1"
    assert bad_arguments(parse_args(["--communication-sample-every", "0"])) is None  # 0: never sampled


def test_only_the_text_kept_is_read(tmp_path: Path) -> None:
    """A corpus of one large file was read whole into every rank's memory before the cut."""
    import tracemalloc

    from largo.runtime import data

    big = tmp_path / "big.txt"
    with big.open("wb") as handle:
        handle.truncate(256 << 20)  # 256 MiB, sparse
    tracemalloc.start()
    try:
        tokens = data.load_bytes([big], 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tokens) == 1000
    assert peak < 1 << 20  # it held the whole file (256 MiB) before
