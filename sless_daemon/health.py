"""Dependency checks that answer within a deadline even when Redis or MongoDB hangs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from .queue import JobQueue
from .store import OutcomeStore


class HealthChecker:
    """Runs each check in a small thread pool and stops waiting at the deadline.

    The clients given here should have socket timeouts near the deadline too, so a
    hung dependency does not pile up threads.
    """

    def __init__(self, store: OutcomeStore, queue: JobQueue, deadline_s: float):
        self.store = store
        self.queue = queue
        self.deadline_s = deadline_s
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health")

    def check(self, probe: Callable[[], dict | None]) -> dict:
        """{"status": "ok"|"down", "latency_ms", ...probe's fields or "error"}."""
        return self.check_all({"one": probe})["one"]

    def check_all(self, probes: dict[str, Callable[[], dict | None]]) -> dict[str, dict]:
        """Run several probes at once under one shared deadline."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.deadline_s
        futures = {name: self.pool.submit(probe) for name, probe in probes.items()}
        return {name: self._collect(future, started, deadline) for name, future in futures.items()}

    def _collect(self, future, started: float, deadline: float) -> dict:
        try:
            extra = future.result(timeout=max(0.0, deadline - time.monotonic())) or {}
            status = {"status": "ok", **extra}
        except FutureTimeout:
            status = {"status": "down", "error": f"no answer within {self.deadline_s:g} s"}
        except Exception as e:  # noqa: BLE001 - any failure of a probe means "down"
            status = {"status": "down", "error": str(e)[:300]}
        status["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return status

    def redis(self) -> dict:
        return self.check(self.queue.ping)

    def mongo(self) -> dict:
        return self.check(self._mongo_probe)

    def everything(self) -> dict[str, dict]:
        """Redis, MongoDB and the queue's depth and live workers, checked together."""
        return self.check_all({"redis": self.queue.ping, "mongodb": self._mongo_probe, "queue": self._queue_probe})

    def _mongo_probe(self) -> dict:
        return {"collections": self.store.collection_names()}

    def _queue_probe(self) -> dict:
        return {"depth": self.queue.depth(), "live_workers": self.queue.live_workers()}
