"""The transport: an RQ queue in Redis carrying jobs to workers, and word of their ends.

Each message carries what a worker needs to run one attempt (the job's code, input,
limits and the attempt's number), as JSON (RQ's JSONSerializer), so a worker starts
without reading MongoDB; MongoDB keeps the record. RQ keeps no results
(`result_ttl=0`): outcomes live in MongoDB. After an attempt is recorded, its job id
is pushed on a short-lived list, so whoever waits for the job (`POST /execute`)
wakes at once instead of polling MongoDB.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import redis
import rq
import bson
from bson.codec_options import CodecOptions
from rq.intermediate_queue import IntermediateQueue
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from . import feed
from .errors import redis_call
from .metrics import count_settled

SETTLED_KEY = "sless:settled-bson:"  # + job id: a list that gets one BSON item per recorded attempt
SETTLED_TTL_S = 60  # a waiter is usually blocked on the list already; nobody else reads it
ANNOUNCED_EVENT_MAX_BYTES = 4096
EVENT_CODEC = CodecOptions(tz_aware=True, tzinfo=timezone.utc)  # announced events are BSON, as stored
TAKEN_KEY = "sless:taken:"  # + queue name: a sorted set of messages taken by workers and not yet handled, by time
HANDLED_TTL_S = 600  # a handled message stays this long, so the orphan scan can tell it was handled
CANCEL_KEY = "sless:cancel:"  # + job id: the attempt to cancel (lifecycle.cancel), read by its worker
CANCEL_TTL_S = 24 * 3600
RUN_JOB = "sless_daemon.worker.run_job"  # the function RQ workers call, by name
# KEYS: the taken set, RQ's intermediate list, the message's hash; ARGV: the message, the
# latest taken time to forget, the expiry of a handled message. Returns 1 if it forgot it.
FORGET_STUCK = """
local forgot = 0
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then forgot = redis.call('ZREM', KEYS[1], ARGV[1]) end
forgot = forgot + redis.call('LREM', KEYS[2], 0, ARGV[1])
if forgot > 0 then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
return forgot
"""
# RQ's own job timeout is off (job_timeout=-1): the executor enforces each attempt's limits,
# and RQ's alarm would cut short a worker that keeps a finished outcome while MongoDB is away.


def _will_start(status: bytes | None, started_at: bytes | None, now: datetime, grace_s: float) -> bool:
    """Whether a message in this RQ status still leads to (or led to) the attempt being claimed."""
    if status in (b"queued", b"scheduled", b"deferred", b"finished"):
        return True
    if status == b"started" and started_at:
        started = datetime.fromisoformat(started_at.decode().replace("Z", "+00:00"))
        if started.tzinfo is None:
            started = started.replace(tzinfo=timezone.utc)
        return (now - started).total_seconds() < grace_s
    return False


def message_id(job_id: str, attempts: int) -> str:
    """The RQ job id of the message for the attempt after `attempts`."""
    return f"{job_id}-{attempts}"


def attempt_of(message: str) -> tuple[str, int] | None:
    """(job id, attempts) a message id names (`message_id`), or None for another id."""
    job_id, _, attempts = message.rpartition("-")
    return (job_id, int(attempts)) if job_id and attempts.isdigit() else None


def connect_redis(url: str, timeout_s: float = 3.0) -> redis.Redis:
    """A client whose calls fail within `timeout_s` when Redis is away or hung."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30,
    )


class JobQueue:
    """Enqueues job ids on the RQ queue workers consume."""

    def __init__(self, connection: redis.Redis, name: str):
        self.connection = connection
        self.rq_queue = rq.Queue(name, connection=connection, serializer=JSONSerializer)

    @property
    def name(self) -> str:
        return self.rq_queue.name

    @redis_call
    def enqueue(self, job: dict, attempts: int) -> None:
        """Hand a job (as stored: `_id`, code, input_json, ...) to the workers now, for its
        attempt after `attempts`.

        The RQ job id names the job and that attempt, so a sweeper can ask Redis
        whether the message still exists (`missing`). Delayed retries wait in
        MongoDB, not here.
        """
        self.enqueue_many([job], attempts)

    @redis_call
    def enqueue_many(self, jobs: list[dict], attempts: int = 0) -> None:
        """Enqueue several jobs' attempts after `attempts` in one round trip (RQ's `enqueue_many`)."""
        with self.connection.pipeline() as pipe:
            self.rq_queue.enqueue_many([self._message(job, attempts) for job in jobs], pipeline=pipe)
            pipe.execute()

    def _message(self, job: dict, attempts: int) -> rq.queue.EnqueueData:
        message = {"job_id": job["_id"], "attempt": attempts + 1, "code": job["code"],
                   "input_json": job["input_json"], "entry": job.get("entry"), "limits": job["limits"],
                   "retries": job["retries"], "timeout_s": job["timeout_s"], "enqueued_at": time.time()}
        return rq.Queue.prepare_data(
            RUN_JOB, args=(message,), job_id=message_id(job["_id"], attempts),
            timeout=-1, result_ttl=0, failure_ttl=24 * 3600, description=f"sless job {job['_id']}",
        )

    @redis_call
    def announce_settled(self, events: list[dict], handled: list[str] = ()) -> None:
        """Wake whoever waits for these jobs with the settle events just recorded
        (store.settle_event), so they need not read them back from MongoDB; and mark the
        `handled` messages finished (`mark_handled`), those whose attempts' records
        were written only now (worker.AttemptRunner).

        An event larger than ANNOUNCED_EVENT_MAX_BYTES (a big result or output) is
        announced without its outcome, and its waiter reads the record: every job is
        announced, waited for or not, so the lists must stay small. The same pipeline
        appends the new state to the job's feed (feed.py) and counts the attempt for
        `GET /metrics` (metrics.py).
        """
        if not events and not handled:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for message in handled:
                self.mark_handled(pipe, message, "finished")
            for event in events:
                data = bson.encode(event)
                if len(data) > ANNOUNCED_EVENT_MAX_BYTES:
                    data = bson.encode({k: event[k] for k in ("job_id", "attempt", "state")})
                pipe.rpush(SETTLED_KEY + event["job_id"], data)
                pipe.expire(SETTLED_KEY + event["job_id"], SETTLED_TTL_S)
                feed.append(pipe, event["job_id"], feed.state_entry(event["attempt"], event["state"]))
                count_settled(pipe, self.name, event)
            pipe.execute()

    @redis_call
    def mark_finished(self, messages: list[str]) -> None:
        """Mark handled messages finished, in one round trip (`mark_handled`)."""
        with self.connection.pipeline(transaction=False) as pipe:
            for message in messages:
                self.mark_handled(pipe, message, "finished")
            pipe.execute()

    def mark_handled(self, pipe, message: str, status: str) -> None:
        """Queue on `pipe`: mark a message handled and let it expire after HANDLED_TTL_S; a
        finished one is no longer among the taken (a failed one stays, for the sweep to send again)."""
        key = rq.job.Job.redis_job_namespace_prefix + message
        pipe.hset(key, "status", status)
        pipe.expire(key, HANDLED_TTL_S)
        if status == "finished":
            pipe.zrem(self.taken_key, message)

    @redis_call
    def wait_settled(self, job_id: str, timeout_s: float) -> dict | None:
        """Block until an attempt of the job is recorded (its settle event) or `timeout_s` passes."""
        found = self.connection.blpop([SETTLED_KEY + job_id], timeout=max(0.01, timeout_s))
        return bson.decode(found[1], codec_options=EVENT_CODEC) if found else None

    @redis_call
    def request_cancel(self, job_id: str, attempt: int) -> None:
        """Ask the worker running this attempt to kill it (it checks while the attempt runs)."""
        self.connection.set(CANCEL_KEY + job_id, attempt, ex=CANCEL_TTL_S)

    @redis_call
    def cancel_requested(self, job_id: str, attempt: int) -> bool:
        return self.connection.get(CANCEL_KEY + job_id) == str(attempt).encode()

    @redis_call
    def resend(self, job: dict, attempts: int) -> None:
        """Enqueue again a message Redis lost or a worker dropped: the old hash, if any, may
        carry the expiry of a handled message, and its id may sit in RQ's intermediate list."""
        self.enqueue(job, attempts)
        key = message_id(job["_id"], attempts)
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.persist(rq.job.Job.redis_job_namespace_prefix + key)
            pipe.lrem(self.intermediate_key, 0, key)
            pipe.execute()

    @property
    def taken_key(self) -> str:
        return TAKEN_KEY + self.name

    @redis_call
    def taken_before(self, epoch_s: float, limit: int = 1000) -> list[str]:
        """Ids of messages a worker took before `epoch_s` and never marked finished (consumer.TAKE)."""
        return [m.decode() for m in self.connection.zrangebyscore(self.taken_key, "-inf", epoch_s, 0, limit)]

    @redis_call
    def busy_workers(self) -> set[str]:
        """Names of the workers handling a message now: those of the messages taken and not yet
        marked finished (TAKE notes the taker in each one's hash). An idle worker has none."""
        taken = self.connection.zrange(self.taken_key, 0, -1)
        if not taken:
            return set()
        with self.connection.pipeline(transaction=False) as pipe:
            for message in taken:
                pipe.hget(rq.job.Job.redis_job_namespace_prefix + message.decode(), "worker_name")
            return {name.decode() for name in pipe.execute() if name}

    @redis_call
    def parked(self) -> list[str]:
        """Ids a worker's blocking pop moved into RQ's intermediate list and never took over."""
        ids = [p.decode() for p in self.connection.lrange(self.intermediate_key, 0, -1)]
        if not ids:
            return []
        with self.connection.pipeline(transaction=False) as pipe:
            for message in ids:
                pipe.hget(rq.job.Job.redis_job_namespace_prefix + message, "status")
            statuses = pipe.execute()
        return [message for message, status in zip(ids, statuses) if status in (None, b"queued")]

    @redis_call
    def note_taken(self, message: str, at: float) -> None:
        """Track a message as taken at `at` (epoch s), as TAKE does (the sweep keeps watching it)."""
        self.connection.zadd(self.taken_key, {message: at})

    @redis_call
    def forget_stuck(self, message: str, taken_before: float) -> bool:
        """Stop tracking a message taken before `taken_before` (epoch s), or parked, and let it
        expire as a handled one does (a message sent again gets a new life: `resend`). True
        for the one sweeper that did: another that listed it too, or a message a worker took
        again since, is left alone."""
        key = rq.job.Job.redis_job_namespace_prefix + message
        return bool(self.connection.eval(FORGET_STUCK, 3, self.taken_key, self.intermediate_key, key,
                                         message, taken_before, HANDLED_TTL_S))

    @property
    def intermediate_key(self) -> str:
        """Where RQ's blocking pop (BLMOVE) parks a message until its worker takes it over."""
        return IntermediateQueue(self.rq_queue.key, connection=self.connection).key

    @redis_call
    def marker(self, key: str) -> tuple[bytes, bool]:
        """The value of a marker key, and whether it was missing (then set now; recovery.redis_forgot)."""
        value = self.connection.get(key)
        if value is not None:
            return value, False
        self.connection.set(key, uuid.uuid4().hex, nx=True)
        return self.connection.get(key), True

    @redis_call
    def server_run(self) -> str | None:
        """Redis's run id, a new one each time the server starts (recovery.redis_forgot); None
        where `INFO` is refused (an ACL, a proxy) or has none."""
        try:
            return self.connection.info("server").get("run_id")
        except redis.ResponseError:
            return None

    @redis_call
    def missing(self, jobs: list[tuple[str, int]], started_grace_s: float) -> list[int]:
        """Indexes of the (job_id, attempts) pairs that no worker will start from Redis.

        That is: no message (Redis lost it), a message that failed (its worker could not
        claim it), or one a worker took more than `started_grace_s` ago without
        finishing with it (the worker died between dequeue and claim). A `finished`
        message was handled: its attempt was claimed (or found taken).
        """
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.lrange(self.intermediate_key, 0, -1)
            for job_id, attempts in jobs:
                pipe.hmget(rq.job.Job.redis_job_namespace_prefix + message_id(job_id, attempts),
                           ["status", "started_at"])
            parked, *found = pipe.execute()
        parked = {p.decode() for p in parked}  # popped by a worker that never took them over: it died
        now = datetime.now(timezone.utc)
        return [i for i, ((status, started_at), (job_id, attempts)) in enumerate(zip(found, jobs))
                if not _will_start(status, started_at, now, started_grace_s)
                or (status == b"queued" and message_id(job_id, attempts) in parked)]

    @redis_call
    def depth(self) -> int:
        """Jobs waiting in the queue now (not counting retries waiting for their time)."""
        return self.rq_queue.count

    @redis_call
    def oldest_wait_s(self) -> float:
        """How long the message at the head of the queue has waited (0 when none)."""
        head = self.connection.lindex(self.rq_queue.key, 0)
        if head is None:
            return 0.0
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hget(rq.job.Job.redis_job_namespace_prefix + head.decode(), "enqueued_at")
            pipe.time()  # one clock for every pool on every host (the enqueuing daemon's should agree: NTP)
            enqueued, (seconds, micros) = pipe.execute()
        if not enqueued:
            return 0.0
        now = datetime.fromtimestamp(seconds + micros / 1e6, timezone.utc)
        return max(0.0, (now - utcparse(enqueued.decode()).replace(tzinfo=timezone.utc)).total_seconds())

    @redis_call
    def live_workers(self) -> int:
        """Workers registered on this queue whose heartbeat has not expired."""
        return rq.Worker.count(queue=self.rq_queue)

    @redis_call
    def worker_alive(self, name: str) -> bool:
        """Whether a worker is registered with a heartbeat not expired (its pool unregisters a
        dead one at once; a lost host's expire within RQ's worker TTL, 7 minutes)."""
        key = rq.Worker.redis_worker_namespace_prefix + name
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.sismember(rq.Worker.redis_workers_keys, key)
            pipe.exists(key)
            return all(pipe.execute())

    @redis_call
    def forget_worker(self, name: str) -> None:
        """Unregister a dead worker at once, instead of when its heartbeat key expires."""
        worker = rq.Worker.find_by_key(rq.Worker.redis_worker_namespace_prefix + name, connection=self.connection,
                                       serializer=JSONSerializer)
        if worker is not None:
            worker.register_death()

    @redis_call
    def ping(self) -> None:
        self.connection.ping()
