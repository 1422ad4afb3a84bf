"""The worker's loop over the RQ queue: take a message, run it, mark it handled; nothing else per job.

RQ's own `SimpleWorker` keeps, per job, registries, a result or its deletion, counters
and a heartbeat: measured with py-spy on a draining sless worker, that bookkeeping
took 42% of the worker's main thread, more than claiming, running and recording the
attempt together (BENCHMARKS.md). sless keeps its own record in MongoDB and never
reads RQ's, so this loop uses RQ for what it needs only:

- it registers as an RQ worker and keeps its key alive from a thread, so `rq info`,
  `GET /health` and the pool see it;
- it takes a message, marks it `started` and reads its payload in one round trip (a
  Lua script, `TAKE`): an LPOP while the queue has messages; when it is empty, RQ's
  own blocking move into its intermediate list (BLMOVE) waits for the next, and the
  script then takes that one out of the list. The payload is RQ's: the job hash's
  `data`, zlib-compressed JSON of (function, instance, args, kwargs), read with RQ's
  JSONSerializer. A message popped by a worker that died before claiming it is
  `started` without end (or left `queued` in the intermediate list), and the orphan
  scan re-sends it after a grace period (`JobQueue.missing`);
- it marks a handled message `finished` (`failed` when handling raised, so the
  orphan scan re-sends it) and lets Redis expire it: from then on the attempt's
  lease, or its settle event, is what counts. `finished` goes with the next `TAKE`,
  which follows at once (or as the loop ends); for an attempt whose claim is written
  with its settle, it goes with that settle's announcement instead (the handler says
  so: worker.AttemptRunner). `TAKE` also notes each message it takes
  in a sorted set (`queue.TAKEN_KEY`) and `finished` removes it, so the recovery sweep
  finds a message taken and never handled by looking there, without reading every job;
- `TAKE` also says how many messages were still queued behind the one it took, which
  the handler is given: with a queue to drain, the worker writes an attempt's outcome
  once the next attempt runs (worker.Recorder), not while it is being started.

Measured (BENCHMARKS.md, session 4, step 10): RQ's `Queue.dequeue_any` plus the
`started` and `finished` marks took four round trips and 0.5-0.7 ms of the worker's CPU
per job (building RQ's Job object parses every field of the hash); `TAKE` takes one.

SIGTERM or SIGINT lets the running job finish, then the loop ends (a warm shutdown).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import zlib
from typing import Callable

import redis
import rq
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from .queue import HANDLED_TTL_S, JobQueue

log = logging.getLogger(__name__)

DEQUEUE_WAIT_S = 1  # how long one blocking pop waits: the loop sees a stop request this often
HEARTBEAT_S = 30.0
REDIS_RETRY_S = 1.0

# KEYS: the queue, RQ's intermediate list, the queue's set of taken messages (queue.TAKEN_KEY).
# ARGV: RQ's job hash prefix, started_at, worker name, the id BLMOVE parked in the intermediate
# list ('' to pop from the queue), the id of the message handled last ('' if none) to mark
# finished, how long a handled message stays, and now (epoch seconds). Returns {id, data, queued},
# data false when the hash is gone and queued the messages still queued, or nil when the queue is empty.
TAKE = """
if ARGV[5] ~= '' then
  redis.call('HSET', ARGV[1] .. ARGV[5], 'status', 'finished')
  redis.call('EXPIRE', ARGV[1] .. ARGV[5], ARGV[6])
  redis.call('ZREM', KEYS[3], ARGV[5])
end
local id = ARGV[4]
if id == '' then
  id = redis.call('LPOP', KEYS[1])
  if not id then return false end
else
  redis.call('LREM', KEYS[2], 1, id)
end
local key = ARGV[1] .. id
local data = redis.call('HGET', key, 'data')
if data then
  redis.call('HSET', key, 'status', 'started', 'started_at', ARGV[2], 'worker_name', ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[7], id)
end
return {id, data, redis.call('LLEN', KEYS[1])}
"""


def message_payload(data: bytes) -> dict:
    """The dict an RQ message of `JobQueue.enqueue` carries: its job hash's `data` is the
    (function, instance, args, kwargs) tuple, JSON, zlib-compressed (as RQ's Job.restore reads it)."""
    try:
        data = zlib.decompress(data)
    except zlib.error:
        pass  # RQ reads an uncompressed payload too
    _, _, args, _ = JSONSerializer.loads(data)
    return args[0]


class Consumer:
    """Feeds each message's payload to `handle`, one at a time, until told to stop."""

    def __init__(self, queue: JobQueue, name: str, handle: Callable[[dict, int], bool],
                 idle: Callable[[], None] = lambda: None):
        """`handle(payload, queued)` gets how many messages were queued behind this one when it
        was taken, and returns False when it marks the message finished itself later (once the
        attempt's record is written: worker.AttemptRunner); `idle` is called whenever the
        queue is found empty, before waiting for a message."""
        self.queue = queue
        self.connection = queue.connection
        self.handle = handle
        self.idle = idle
        self.worker = rq.Worker([queue.rq_queue], connection=self.connection, name=name,
                                serializer=JSONSerializer)
        self.stopping = threading.Event()
        self.take = self.connection.register_script(TAKE)
        self.keys = [queue.rq_queue.key, queue.intermediate_key, queue.taken_key]
        self.handled = ""  # the id of the message handled last, until TAKE marks it finished

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
            if self.handled:
                self._mark(self.handled, "finished")
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
            taken = self.next_message()
        except redis.RedisError as e:
            log.warning("cannot take messages from Redis (%s); trying again", e)
            time.sleep(REDIS_RETRY_S)
            return
        if taken is None:
            return
        message_id, data, queued = taken
        if data is None:
            log.warning("message %s has no payload any more (expired or deleted); skipped", message_id)
            return
        try:
            handled = self.handle(message_payload(data), queued)
        except Exception:  # noqa: BLE001 - a bad message must not stop the loop; the sweep re-sends what waits
            log.exception("message %s could not be handled", message_id)
            self._mark(message_id, "failed")
        else:
            self.handled = message_id if handled else ""

    def next_message(self) -> tuple[str, bytes | None, int] | None:
        """(id, payload, messages queued behind it) of the next message, marked started; waits up
        to DEQUEUE_WAIT_S for one."""
        taken = self._take("")
        if taken is None:
            self.idle()
            parked = self.connection.blmove(self.keys[0], self.keys[1], DEQUEUE_WAIT_S)
            if parked is None:
                return None
            taken = self._take(parked.decode())
        message_id, data, queued = taken
        return message_id.decode(), data, queued

    def _take(self, parked: str):
        taken = self.take(keys=self.keys, args=[rq.job.Job.redis_job_namespace_prefix, utcformat(now()),
                                                self.worker.name, parked, self.handled, HANDLED_TTL_S, time.time()])
        self.handled = ""
        return taken

    def keep_registered(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            try:
                self.worker.heartbeat()
            except redis.RedisError as e:
                log.warning("heartbeat to Redis failed: %s", e)

    def _mark(self, message_id: str, status: str) -> None:
        """Mark a handled message (queue.mark_handled) on its own."""
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                self.queue.mark_handled(pipe, message_id, status)
                pipe.execute()
        except redis.RedisError as e:
            log.warning("could not mark message %s %s: %s", message_id, status, e)
