"""Group commit of submits: concurrent `POST /submit` requests share one MongoDB insert and
one Redis round trip.

Each accepted job costs the daemon, FerretDB and Redis a fixed price per call (a
transaction and a commit in FerretDB, a round trip each) and little per document, so
when requests arrive together the first becomes the leader: it writes its own job and
every job queued behind it while it writes, as one group (Lifecycle.accept_many), then
hands the lead to the first request that queued meanwhile. A lone request is written
at once, by its own thread: no batching delay, no extra thread. Every request still
gets its own answer, the same for the whole group: accepted, or refused (503) with the
records withdrawn when the enqueue failed (Lifecycle.accept_many says what is left
when MongoDB itself goes away in the middle).
"""

from __future__ import annotations

import threading
from typing import Callable

from .spec import JobSpec

MAX_GROUP = 64


class _Request:
    """One submit waiting in the group: its spec, then its job or its error."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.job: dict | None = None
        self.stages: dict = {}
        self.error: BaseException | None = None
        self.lead = False
        self.woken = threading.Event()

    def outcome(self) -> dict:
        if self.error is not None:
            raise self.error  # the group's error, the same object in every thread of the group
        return self.job


class GroupCommit:
    """Accepts jobs through `accept_many`, grouping requests that overlap."""

    def __init__(self, accept_many: Callable[[list[JobSpec], dict], list[dict]]):
        self.accept_many = accept_many
        self.lock = threading.Lock()
        self.queued: list[_Request] = []
        self.leading = False

    def accept(self, spec: JobSpec, stages: dict) -> dict:
        """Record and enqueue one job (with whatever others are submitted meanwhile); its document."""
        request = _Request(spec)
        with self.lock:
            self.queued.append(request)
            request.lead, self.leading = not self.leading, True
        if not request.lead:
            request.woken.wait()
        if request.lead:
            self._write_group()
        stages.update(request.stages)
        return request.outcome()

    def _write_group(self) -> None:
        """Write the queued requests (this leader's first), answer them, pass the lead on."""
        with self.lock:
            group, self.queued = self.queued[:MAX_GROUP], self.queued[MAX_GROUP:]
        stages: dict = {}
        try:
            jobs = self.accept_many([request.spec for request in group], stages)
        except BaseException as e:  # noqa: BLE001 - every request of the group gets the same error
            for request in group:
                request.error = e
        else:
            for request, job in zip(group, jobs):
                request.job, request.stages = job, stages
        with self.lock:
            following = self.queued[0] if self.queued else None
            if following is not None:
                following.lead = True
            self.leading = following is not None
        for request in group[1:]:
            request.woken.set()
        if following is not None:
            following.woken.set()
