"""A new leader's indexes against the API server: entries of objects gone in two listings a few
seconds apart mean a watch missed their deletion (kopf drops an index entry only on a DELETED
event), and the process starts over; an object deleted or created at the moment of a list, or a
listing that fails, is no reason to."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from largo.controllers.freshness import Identities, describe, indexed, stale, verify
from largo.controllers.state import PodUsage

LISTED = {"pods": {"p1", "p2"}, "nodes": {"n0"}, "trainjobs": {"j1"}, "inferenceservices": {"s1"}}


def _run(held: list[Identities], listings: list[Identities | Exception]) -> tuple[Any, list[Any]]:
    told: list[Mapping[str, set[str]]] = []
    reads, lists = iter(held), iter(listings)

    async def list_objects() -> Identities:
        listing = next(lists)
        if isinstance(listing, Exception):
            raise listing
        return listing

    found = asyncio.run(verify(lambda: next(reads), list_objects, told.append, settle=0))
    return found, told


def test_fresh_indexes_are_left_alone() -> None:
    found, told = _run([LISTED], [LISTED])
    assert (found, told) == ({}, [])


def test_entries_of_objects_gone_in_both_listings_end_the_process() -> None:
    held = {**LISTED, "pods": {"p1", "p2", "gone"}, "trainjobs": {"j1", "old-job"}}
    found, told = _run([held, held], [LISTED, LISTED])
    assert found == {"pods": {"gone"}, "trainjobs": {"old-job"}}
    assert told == [found]
    assert describe(found) == "1 pods, 1 trainjobs"


def test_an_object_created_at_the_moment_of_the_first_list_is_no_stale_entry() -> None:
    held = {**LISTED, "pods": {"p1", "p2", "new"}}
    found, told = _run([held, held], [LISTED, {**LISTED, "pods": {"p1", "p2", "new"}}])
    assert (found, told) == ({}, [])


def test_an_object_whose_deletion_was_on_its_way_is_no_stale_entry() -> None:
    held = {**LISTED, "pods": {"p1", "p2", "leaving"}}
    found, told = _run([held, LISTED], [LISTED, LISTED])  # its DELETED event arrived meanwhile
    assert (found, told) == ({}, [])


def test_a_listing_that_fails_proves_nothing() -> None:
    held = {**LISTED, "pods": {"p1", "p2", "gone"}}
    found, told = _run([held], [OSError("connection refused")])
    assert (found, told) == ({}, [])


def test_what_the_indexes_hold_is_read_from_their_entries_and_bodies() -> None:
    class Entry:
        def __init__(self, uid: str) -> None:
            self.uid = uid

    indexes = {
        "pod_inventory": {"n0": [PodUsage("p1", {})]},
        "trainjob_pods": {("ns", "j"): [{"metadata": {"uid": "p2"}}]},
        "service_pods": {("ns", "s"): [{"metadata": {"uid": "p3"}}]},
        "service_routers": {},
        "node_inventory": {"n0": [object()], "n1": [object()]},
        "trainjob_queue": {("ns", "j"): [Entry("j1")]},
        "service_queue": {("ns", "s"): [Entry("s1")]},
    }
    assert indexed(indexes) == {
        "pods": {"p1", "p2", "p3"},
        "nodes": {"n0", "n1"},
        "trainjobs": {"j1"},
        "inferenceservices": {"s1"},
    }
    assert stale(indexed(indexes), LISTED) == {"pods": {"p3"}, "nodes": {"n1"}}


def test_the_api_server_s_objects_are_read_page_by_page_keeping_only_their_identities() -> None:
    """A large cluster's pods in one list, whole, took the operator's memory (1 GiB from ~12k pods)."""
    import json
    from types import SimpleNamespace

    from largo.controllers.kube import LIST_PAGE, Kube
    from largo.controllers.leader import LeaderGate

    calls: list[tuple[Any, ...]] = []

    def pages(kind: str, key: str, total: int) -> Any:
        def call(*args: Any, limit: int, _continue: str | None, **_: Any) -> Any:
            calls.append((kind, limit, _continue))
            start = int(_continue or 0)
            items = [{"metadata": {key: f"{kind}-{i}"}} for i in range(start, min(start + limit, total))]
            token = str(start + limit) if start + limit < total else None
            return SimpleNamespace(data=json.dumps({"items": items, "metadata": {"continue": token}}))

        return call

    kube = Kube.__new__(Kube)
    kube.gate = LeaderGate()
    kube.core = SimpleNamespace(  # type: ignore[assignment]
        list_pod_for_all_namespaces=pages("pod", "uid", 1200), list_node=pages("node", "name", 3)
    )
    jobs, services = pages("job", "uid", 2), pages("service", "uid", 0)
    kube.custom = SimpleNamespace(  # type: ignore[assignment]
        list_cluster_custom_object=lambda group, version, plural, **kw: (
            jobs if plural == "trainjobs" else services
        )(**kw)
    )
    found = asyncio.run(kube.list_identities())
    assert len(found["pods"]) == 1200
    assert found["nodes"] == {"node-0", "node-1", "node-2"}
    assert found["trainjobs"] == {"job-0", "job-1"}
    assert found["inferenceservices"] == set()
    pod_pages = [token for kind, limit, token in calls if kind == "pod" and limit == LIST_PAGE]
    assert pod_pages == [None, "500", "1000"]


def test_checks_asked_while_one_runs_make_one_more_run_after_it_at_least_the_interval_later() -> None:
    """Several kinds' watches expire together: their asks while a check runs make one run after it,
    whose listings follow the relists that asked."""
    from largo.controllers.freshness import Rechecks

    async def scenario() -> tuple[int, list[float]]:
        loop = asyncio.get_running_loop()
        started: list[float] = []
        running, release = asyncio.Event(), asyncio.Event()

        async def check() -> None:
            started.append(loop.time())
            running.set()
            await release.wait()
            release.clear()

        rechecks = Rechecks(check, interval=0.2)
        rechecks.ask()
        await running.wait()
        running.clear()
        rechecks.ask()
        rechecks.ask()  # a third kind's watch: no third run
        release.set()
        await running.wait()
        release.set()
        assert rechecks.task is not None
        await rechecks.task
        return rechecks.runs, started

    runs, started = asyncio.run(scenario())
    assert runs == 2
    assert started[1] - started[0] >= 0.2


def test_a_check_asked_soon_after_the_last_waits_for_the_interval_and_stop_cancels_it() -> None:
    from largo.controllers.freshness import Rechecks

    async def scenario() -> tuple[int, bool]:
        runs: list[None] = []

        async def check() -> None:
            runs.append(None)

        rechecks = Rechecks(check, interval=3600)
        rechecks.ask()
        assert rechecks.task is not None
        await rechecks.task
        rechecks.ask()  # an hour's wait before it may run
        waiting = rechecks.task
        await asyncio.sleep(0.05)
        await rechecks.stop()
        rechecks.ask()  # a watch that expires while the operator stops starts nothing
        assert rechecks.task is waiting
        return len(runs), waiting.cancelled()

    assert asyncio.run(scenario()) == (1, True)
