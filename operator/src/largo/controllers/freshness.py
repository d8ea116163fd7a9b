"""The indexes checked against the API server when a replica comes to lead, and while it leads after
a watch that expired.

kopf removes an index entry only on a DELETED event. After a watch cut for longer than etcd's
compaction window (about 5 minutes), its resource version is gone (410 Gone) and it lists again, but
an object deleted meanwhile never sends its DELETED event, so it stays in the indexes: a deleted pod's
GPUs counted as held, a deleted job's placement reserved, until the process restarts. A standby that
was cut off and later leads would act on them; so would a leader whose watches were cut while its
Lease renewals went through (an API server restarted behind a load balancer, a watch cache rebuilt).
So a new leader, and a leader after any watch of its own expired, lists what its decisions rest on
(pods, nodes, TrainJobs, InferenceServices) and compares: entries of objects that are gone from two
listings, longer apart than a stalled watch takes to reconnect (an object deleted or created at the
moment of a list is in one listing and not the other), mean stale indexes, and the process exits to
start over with fresh ones. The scheduler and the workers run meanwhile: a stale entry mostly
over-counts the GPUs held, and delaying every takeover by the check would cost more.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from largo.controllers.scheduler import index_values

logger = logging.getLogger(__name__)

# Identities by kind: UIDs for namespaced objects, names for nodes (the node index is keyed by name).
Identities = Mapping[str, set[str]]

# Beyond the watch-inactivity timeout (LARGO_WATCH_INACTIVITY_SECONDS): how long a DELETED event
# already on its way may take to reach the indexes, a silently stalled watch included (kopf
# reconnects one after that timeout, and a takeover often follows network trouble).
SETTLE_MARGIN_SECONDS = 30.0

# Checks asked for by expired watches start at least this far apart: the watches of several kinds
# often expire together, and on a large cluster a check lists every pod.
RECHECK_INTERVAL_SECONDS = 60.0


def indexed(indexes: Mapping[str, Any]) -> dict[str, set[str]]:
    """What the indexes hold, by kind."""

    def uid(value: Any) -> str:
        # Entries (PodUsage, JobEntry, ServiceEntry) carry the UID; the pod indexes hold the bodies.
        return str(value.uid) if hasattr(value, "uid") else str(value["metadata"]["uid"])

    def uids(*names: str) -> set[str]:
        return {uid(value) for name in names for value in index_values(indexes[name])}

    return {
        "pods": uids("pod_inventory", "trainjob_pods", "service_pods", "service_routers"),
        "nodes": {str(name) for name in indexes["node_inventory"]},
        "trainjobs": uids("trainjob_queue"),
        "inferenceservices": uids("service_queue"),
    }


def stale(held: Identities, listed: Identities) -> dict[str, set[str]]:
    """Entries of the indexes whose object the listing does not have, by kind."""
    gone = {kind: held[kind] - listed.get(kind, set()) for kind in held}
    return {kind: found for kind, found in gone.items() if found}


async def verify(
    read_indexes: Callable[[], Identities],
    list_objects: Callable[[], Awaitable[Identities]],
    on_stale: Callable[[Mapping[str, set[str]]], None],
    settle: float,
) -> Mapping[str, set[str]]:
    """Calls ``on_stale`` with the entries gone from two listings ``settle`` seconds apart and
    still indexed; returns them (empty when the indexes are fresh). A listing that fails proves
    nothing: the check ends there, logged."""
    try:
        first = stale(read_indexes(), await list_objects())
        if not first:
            return {}
        await asyncio.sleep(settle)
        second = stale(read_indexes(), await list_objects())
    except Exception as error:  # an API hiccup at takeover is no reason to stop leading
        logger.warning("could not check the indexes against the API server: %s", error)
        return {}
    persisting = {kind: first[kind] & second.get(kind, set()) for kind in first}
    persisting = {kind: found for kind, found in persisting.items() if found}
    if persisting:
        on_stale(persisting)
    return persisting


def describe(found: Mapping[str, set[str]]) -> str:
    return ", ".join(f"{len(ids)} {kind}" for kind, ids in sorted(found.items()))


class Rechecks:
    """Runs ``check`` when asked, one at a time. Asked while one runs, it runs once more after it (the
    running one's listings may predate the relist that asked); runs start ``interval`` seconds apart
    at least. Call ``ask`` on the event loop's thread."""

    def __init__(self, check: Callable[[], Awaitable[object]], interval: float) -> None:
        self.check = check
        self.interval = interval
        self.asked = False
        self.runs = 0
        self.task: asyncio.Task[None] | None = None
        self.stopped = False
        self._last_start = -math.inf

    def ask(self) -> None:
        if self.stopped:  # a watch that expires while the operator stops
            return
        self.asked = True
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name="largo-index-check")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.asked:
            wait = self._last_start + self.interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.asked = False
            self._last_start = loop.time()
            self.runs += 1
            await self.check()

    async def stop(self) -> None:
        self.stopped = True
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
