"""The worker's loop over the RQ queue: take a message, run it, mark it handled; nothing else per job.

RQ's own `SimpleWorker` keeps, per job, registries, a result or its deletion, counters
and a heartbeat: measured with py-spy on a draining sless worker, that bookkeeping
took 42% of the worker's main thread, more than claiming, running and recording the
attempt together (BENCHMARKS.md). sless keeps its own record in MongoDB and never
reads RQ's, so this loop uses RQ for what it needs only:

- it registers as an RQ worker and keeps its key alive from a thread, so `rq info`,
  `GET /health` and the pool see it;
- it takes messages with RQ's `Queue.dequeue_any` (a blocking move into RQ's
  intermediate list, then the job hash);
- it marks a message `started` and takes it out of the intermediate list in one
  round trip before running it; a message left `queued` in that list belongs to a
  worker that died in between, and the orphan scan re-sends it (`JobQueue.missing`);
- it marks a handled message `finished` (`failed` when handling raised, so the
  orphan scan re-sends it) and lets Redis expire it: from then on the attempt's
  lease, or its settle event, is what counts.

SIGTERM or SIGINT lets the running job finish, then the loop ends (a warm shutdown).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

import redis
import rq
from rq.exceptions import DequeueTimeout
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from .queue import JobQueue

log = logging.getLogger(__name__)

DEQUEUE_WAIT_S = 1  # how long one blocking pop waits: the loop sees a stop request this often
HEARTBEAT_S = 30.0
REDIS_RETRY_S = 1.0
HANDLED_TTL_S = 600  # a handled message stays this long, so the orphan scan can tell it was handled


class Consumer:
    """Feeds each message's payload to `handle`, one at a time, until told to stop."""

    def __init__(self, queue: JobQueue, name: str, handle: Callable[[dict], None]):
        self.queue = queue
        self.connection = queue.connection
        self.handle = handle
        self.worker = rq.Worker([queue.rq_queue], connection=self.connection, name=name,
                                serializer=JSONSerializer)
        self.stopping = threading.Event()

    def work(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        self.worker.register_birth()
        beat = threading.Thread(target=self.keep_registered, name="rq-heartbeat", daemon=True)
        beat.start()
        try:
            while not self.stopping.is_set():
                self.take_one()
        finally:
            self.stopping.set()
            try:
                self.worker.register_death()
            except redis.RedisError as e:
                log.warning("could not unregister from Redis: %s", e)

    def request_stop(self, signum, frame) -> None:
        if not self.stopping.is_set():
            log.info("worker %s stopping after the running job (%s)", self.worker.name, signal.Signals(signum).name)
        self.stopping.set()

    def take_one(self) -> None:
        try:
            found = rq.Queue.dequeue_any([self.queue.rq_queue], DEQUEUE_WAIT_S, connection=self.connection,
                                         serializer=JSONSerializer)
        except DequeueTimeout:
            return
        except redis.RedisError as e:
            log.warning("cannot take messages from Redis (%s); trying again", e)
            time.sleep(REDIS_RETRY_S)
            return
        if found is None:
            return
        message, _ = found
        self._mark(message, "started", started_at=utcformat(now()), worker_name=self.worker.name,
                   leave=self.queue.intermediate_key)
        try:
            self.handle(message.args[0])
        except Exception:  # noqa: BLE001 - a bad message must not stop the loop; the sweep re-sends what waits
            log.exception("message %s could not be handled", message.id)
            self._mark(message, "failed", expire_s=HANDLED_TTL_S)
        else:
            self._mark(message, "finished", expire_s=HANDLED_TTL_S)

    def keep_registered(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            try:
                self.worker.heartbeat()
            except redis.RedisError as e:
                log.warning("heartbeat to Redis failed: %s", e)

    def _mark(self, message: rq.job.Job, status: str, expire_s: int | None = None, leave: str | None = None,
              **fields) -> None:
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.hset(message.key, mapping={"status": status, **fields})
                if expire_s:
                    pipe.expire(message.key, expire_s)
                if leave:
                    pipe.lrem(leave, 1, message.id)
                pipe.execute()
        except redis.RedisError as e:
            log.warning("could not mark message %s %s: %s", message.id, status, e)
