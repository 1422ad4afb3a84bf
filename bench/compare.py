"""Benchmark: sless next to plain RQ, on the same Redis and machine, in one run.

    scripts/bench                  # as root: runs this with the sandbox's interpreter, services up

It runs A and B on its own interpreter and refuses one other than the sandbox's, so all
three systems run the function on the same Python (other_interpreter).

For `return input * 2` (double) and a ~10 ms CPU-bound variant (cpu10, bench/tasks.py),
at W = 1, 2 and 4 workers:

- A: plain RQ with its default forking `Worker`, the function imported directly;
- B: plain RQ `SimpleWorker` (no fork);
- sless: HTTP submit -> queue -> sandboxed execution -> MongoDB outcome -> state over HTTP.

Measured: throughput draining --jobs queued jobs (from the jobs' own start and end
times, so process start-up is left out; the wall time from starting the workers is
kept too), --rounds times per system in alternating order; latency of --latency-runs
sequential submit-and-wait calls, every system up at once and called in turns (these
machines change speed within minutes: measure_throughput); `POST /submit`
from 8 client processes next to `Queue.enqueue` from one; RSS per worker and per warm
sandbox; a --long-jobs drain cut into 1,000-job slices; the stages of one job; sandbox
start-up (bench/sandbox_start.py's measures). Markdown on stdout, progress on stderr,
every raw number (each latency sample too) in --out. A measurement that fails is
reported in both, and the exit code is then 1.

The queues live in Redis database 12, not the test suite's 9 (which it flushes while
it runs); every key made here is deleted afterwards, and each sless stack's MongoDB
database is dropped when it stops.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import http.client
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import requests  # noqa: E402
import rq  # noqa: E402
from rq.job import Job, JobStatus  # noqa: E402
from rq.registry import FailedJobRegistry, FinishedJobRegistry  # noqa: E402

from bench import tasks  # noqa: E402
from sless_daemon.metrics import ENDED, metrics_key  # noqa: E402
from sless_daemon.sandbox import find_python  # noqa: E402
from sless_daemon.settings import Settings  # noqa: E402
from tests.stack import REDIS_PORT, Stack, wait_until  # noqa: E402

log = logging.getLogger("bench.compare")

BENCH_REDIS_DB = 12
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/{BENCH_REDIS_DB}"
CLIENTS = 8  # concurrent /submit client processes
WARMUP_CALLS = 3  # latency calls made first and not counted, on every system alike
RQ_POLL_S = 0.02  # registry counts are O(1) in Redis
SLESS_POLL_S = 0.02  # one read of the totals in Redis (sless_terminal)
LATENCY_POLL_S = 0.0005
LATENCY_BLOCK = 10  # latency calls to one system before the next system's turn
STAGE_POLL_S = 0.001
STALL_S = 120.0  # no job finished for this long: the measurement fails
TERMINAL = ("completed", "failed")
SLESS_MARKER = "sless:recovery:marker"  # a pool's key in Redis; this db is the benchmark's own
SANDBOX_PYTHON = find_python()[0]  # the interpreter of sless's sandbox (SLESS_SANDBOX_PYTHON is not passed to stacks)
RQ_DONE = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)
SYSTEMS = ("A", "B", "sless")
SYSTEM_NAMES = {"A": "RQ Worker (fork)", "B": "RQ SimpleWorker", "sless": "sless"}
CLAIM_STAGE = "claim (beside the attempt; none when written with the outcome)"
STAGES = ("HTTP accept", "parse", "MongoDB insert", "enqueue", "dequeue wait", CLAIM_STAGE, "sandbox ready",
          "hand-off to code", "user code", "outcome write", "visible", "total seen by client")


class BenchError(Exception):
    """Raised when a measurement cannot complete: a stall, dead workers, a refused request."""


class Recorder:
    """Raw results plus the errors met; a failed measurement is recorded, never fatal."""

    def __init__(self):
        self.data: dict = {"functions": {}, "errors": []}

    def attempt(self, label: str, action):
        """Run `action()` and return its value, or record why it failed and return None."""
        log.info("%s ...", label)
        started = time.monotonic()
        try:
            value = action()
        except Exception as e:  # noqa: BLE001 - one broken measure must not lose the others
            self.error(label, f"{type(e).__name__}: {e}")
            return None
        log.info("%s done in %.1f s", label, time.monotonic() - started)
        return value

    def error(self, label: str, message: str) -> None:
        log.error("%s: %s", label, message)
        self.data["errors"].append({"measure": label, "error": message})

    def check_jobs(self, label: str, drained: dict | None) -> None:
        """Failed or wrong jobs are errors of the run, not footnotes."""
        if drained and (drained["failed"] or drained["wrong_results"]):
            self.error(label, f"{drained['failed']} failed and {drained['wrong_results']} wrong of "
                              f"{drained['jobs']} jobs; first problems: {drained['problems'][:3]}")

    def slot(self, function: str, workers: int, system: str) -> dict:
        return self.data["functions"].setdefault(function, {}).setdefault(str(workers), {}).setdefault(system, {})


# --- numbers ---------------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted samples."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def latency_summary(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    return {"runs": len(ordered), "p50_ms": percentile(ordered, 0.50), "p95_ms": percentile(ordered, 0.95),
            "p99_ms": percentile(ordered, 0.99), "mean_ms": statistics.fmean(ordered), "max_ms": ordered[-1],
            "samples_ms": [round(s, 3) for s in samples_ms]}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def epoch_s(moment: datetime) -> float:
    """Seconds since the epoch; naive datetimes are UTC (pymongo's and RQ's)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def drain_summary(jobs: int, starts: list[float], ends: list[float], wall_s: float, problems: list[str],
                  failed: int) -> dict:
    """Throughput from the jobs' own first start and last end; wall time from starting the workers."""
    first = min(starts)
    span_s = max(ends) - first
    return {"jobs": jobs, "ended": len(ends), "failed": failed, "wrong_results": len(problems) - failed,
            "span_s": span_s, "jobs_per_s": len(ends) / span_s if span_s > 0 else None, "wall_s": wall_s,
            "wall_jobs_per_s": jobs / wall_s, "problems": problems[:20],
            "finish_offsets_s": [round(e - first, 4) for e in sorted(ends)]}


def wait_for_count(count_done, target: int, poll_s: float, alive, what: str) -> None:
    """Poll until `count_done()` reaches `target`; BenchError on a stall or when the workers are gone."""
    last, last_change = -1, time.monotonic()
    while (done := count_done()) < target:
        now = time.monotonic()
        if done != last:
            last, last_change = done, now
        elif now - last_change > STALL_S:
            raise BenchError(f"{what}: {done} of {target} jobs done and none for {STALL_S:.0f} s")
        if not alive() and count_done() < target:
            raise BenchError(f"{what}: the workers exited with {done} of {target} jobs done")
        time.sleep(poll_s)


# --- processes -------------------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, resident KiB) for every process now."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
                table[int(entry.name)] = (int(fields["PPid"]), int(fields.get("VmRSS", "0 kB").split()[0]))
    return table


def children(table: dict[int, tuple[int, int]], pid: int) -> list[int]:
    return [p for p, (parent, _) in table.items() if parent == pid]


def tree_kib(table: dict[int, tuple[int, int]], pid: int) -> int:
    """Resident KiB of a process and all its descendants."""
    return table.get(pid, (0, 0))[1] + sum(tree_kib(table, child) for child in children(table, pid))


def mib(kib: int) -> float:
    return round(kib / 1024, 2)


# --- plain RQ (baselines A and B) ---------------------------------------------------------------


def bench_redis() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def new_rq_queue(kind: str) -> rq.Queue:
    return rq.Queue(f"bench-{kind}-{uuid.uuid4().hex[:8]}", connection=bench_redis())


def drop_keys(connection: redis.Redis, queue_name: str) -> None:
    """Delete every key whose name holds the queue's name: the queue, its registries, and the jobs
    and workers named after it. (Other workers' keys expire by themselves within a minute.)"""
    keys = list(connection.scan_iter(match=f"*{queue_name}*", count=1000))
    for start in range(0, len(keys), 1000):
        connection.delete(*keys[start:start + 1000])
    connection.srem("rq:queues", f"rq:queue:{queue_name}")


def rq_worker_command(kind: str, queue_name: str, name: str, burst: bool) -> list[str]:
    """The real `rq worker` CLI: forking Worker for A, SimpleWorker for B; bench.tasks importable."""
    command = [sys.executable, "-m", "rq.cli", "worker", "--url", REDIS_URL, "--path", str(ROOT), "--name", name,
               "--logging_level", "WARNING", "--quiet"]
    if kind == "B":
        command += ["--worker-class", "rq.worker.SimpleWorker"]
    return command + (["--burst"] if burst else []) + [queue_name]


class RqWorkers:
    """W `rq worker` processes on one queue, stopped (warm, then killed) on exit."""

    def __init__(self, kind: str, queue: rq.Queue, count: int, burst: bool, log_dir: Path):
        self.kind = kind
        self.burst = burst
        self.queue = queue
        self.count = count
        self.log_path = log_dir / f"rq-{queue.name}.log"
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> RqWorkers:
        with open(self.log_path, "ab") as out:
            self.processes = [self.spawn(f"{self.queue.name}-w{i}", out) for i in range(self.count)]
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def spawn(self, name: str, out) -> subprocess.Popen:
        command = rq_worker_command(self.kind, self.queue.name, name, self.burst)
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.processes)

    def wait_registered(self) -> None:
        wait_until(lambda: rq.Worker.count(queue=self.queue) == self.count, 30, "the RQ workers did not register")

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


def enqueue_jobs(queue: rq.Queue, function: str, count: int) -> list[str]:
    """Enqueue `count` jobs in pipelined batches (the queue is being filled, not measured)."""
    ids = []
    for start in range(0, count, 500):
        batch = [rq.Queue.prepare_data(tasks.FUNCTIONS[function], (i,), job_id=f"{queue.name}-{i}")
                 for i in range(start, min(count, start + 500))]
        ids += [job.id for job in queue.enqueue_many(batch)]
    return ids


def rq_finished(queue: rq.Queue) -> int:
    return FinishedJobRegistry(queue=queue).count + FailedJobRegistry(queue=queue).count


def rq_outcome(connection: redis.Redis, ids: list[str], wall_s: float) -> dict:
    """Check every job's status and result, and summarise the drain from RQ's own timestamps."""
    jobs = Job.fetch_many(ids, connection=connection)
    starts, ends, problems, failed = [], [], [], 0
    for value, job in enumerate(jobs):
        status = job.get_status(refresh=False) if job else "missing"
        if status != JobStatus.FINISHED:
            failed += 1
            problems.append(f"{ids[value]}: {status}")
        elif job.return_value() != value * 2:
            problems.append(f"{job.id}: result {job.return_value()!r}")
        if job is not None and job.started_at and job.ended_at:
            starts.append(epoch_s(job.started_at))
            ends.append(epoch_s(job.ended_at))
    return drain_summary(len(ids), starts, ends, wall_s, problems, failed)


def rq_drain(kind: str, function: str, count: int, workers: int, log_dir: Path) -> dict:
    """Enqueue `count` jobs with no worker, then let W burst workers drain them."""
    queue = new_rq_queue(kind)
    try:
        ids = enqueue_jobs(queue, function, count)
        started = time.monotonic()
        with RqWorkers(kind, queue, workers, burst=True, log_dir=log_dir) as pool:
            wait_for_count(lambda: rq_finished(queue), count, RQ_POLL_S, pool.alive, f"RQ {kind}")
            wall_s = time.monotonic() - started
        return rq_outcome(queue.connection, ids, wall_s)
    finally:
        drop_keys(queue.connection, queue.name)


def rq_call(queue: rq.Queue, function: str, value: int) -> float:
    """Milliseconds from enqueue to the result in hand, polling the status every 0.5 ms."""
    started = time.perf_counter()
    job = queue.enqueue(tasks.FUNCTIONS[function], value, job_id=f"{queue.name}-{value}")
    deadline = time.monotonic() + STALL_S
    while (status := job.get_status()) not in RQ_DONE:
        if time.monotonic() > deadline:
            raise BenchError(f"job {job.id} still {status} after {STALL_S:.0f} s")
        time.sleep(LATENCY_POLL_S)
    result = job.return_value()
    elapsed_ms = (time.perf_counter() - started) * 1000
    if status != JobStatus.FINISHED or result != value * 2:
        raise BenchError(f"job {job.id} ended {status} with result {result!r}")
    return elapsed_ms


def rq_enqueue_rate(count: int) -> dict:
    """Direct `Queue.enqueue` from one process, one call per job."""
    queue = new_rq_queue("enqueue")
    try:
        started = time.perf_counter()
        for value in range(count):
            queue.enqueue(tasks.double, value, job_id=f"{queue.name}-{value}")
        span_s = time.perf_counter() - started
        return {"jobs": count, "span_s": span_s, "jobs_per_s": count / span_s}
    finally:
        drop_keys(queue.connection, queue.name)


# --- sless clients ---------------------------------------------------------------------------


def shares(total: int, parts: int) -> list[tuple[int, int]]:
    """(first input, count) for each client, covering 0..total-1."""
    size, extra = divmod(total, parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]


class MinimalHttp:
    """A keep-alive HTTP/1.1 client doing only what a load generator must: send the request,
    read the status line, the headers and a Content-Length body. The submit clients share
    the machine's two cores with the daemon; `http.client` spends about 0.4 ms of CPU per
    call building message objects (measured by `run_clients`), which the daemon then lacks."""

    def __init__(self, url: str):
        address = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((address.hostname, address.port), timeout=120)
        self.host = address.netloc.encode()
        self.buffer = b""

    def post_json(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host, len(body), body))
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._receive()
        head, self.buffer = self.buffer[:end].decode("latin-1").split("\r\n"), self.buffer[end + 4:]
        length = next(int(line.split(":", 1)[1]) for line in head[1:] if line.lower().startswith("content-length:"))
        while len(self.buffer) < length:
            self._receive()
        answer, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(head[0].split()[1]), answer

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


class StdlibHttp:
    """The same calls through the standard library's `http.client`, for comparison."""

    def __init__(self, url: str):
        self.connection = keep_alive(url)

    def post_json(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.connection.request("POST", path, body, {"Content-Type": "application/json"})
        answer = self.connection.getresponse()
        return answer.status, answer.read()

    def close(self) -> None:
        self.connection.close()


CLIENT_KINDS = {"minimal": MinimalHttp, "http.client": StdlibHttp}


def client_submits(url: str, code: str, first: int, count: int, barrier, results, kind: str) -> None:
    """One client process: connect, wait for the others, then POST /submit `count` times on
    one keep-alive connection; reports the ids and its own CPU time.

    Not `requests`: it costs its process about 1.5 ms of CPU per call, and the 8 clients
    share the machine's two cores with the daemon (measured: 3.0 ms of client CPU per
    submit with `requests`, against 1.3 ms in the daemon), so with it this measured the
    clients.
    """
    try:
        client = CLIENT_KINDS[kind](url)
        client.post_json("/submit", b"{}")  # connected and answered (400) before the start
        barrier.wait(timeout=120)
        cpu_before = time.process_time()
        ids, errors = {}, []
        for value in range(first, first + count):
            status, text = client.post_json("/submit", json.dumps({"code": code, "input": value}).encode())
            if status == 202:
                ids[json.loads(text)["jobId"]] = value
            else:
                errors.append(f"{status}: {text[:200]!r}")
        results.put({"ids": ids, "errors": errors, "ended": time.monotonic(),
                     "cpu_s": time.process_time() - cpu_before})
        client.close()
    except Exception as e:  # noqa: BLE001 - the parent reports it
        results.put({"ids": {}, "errors": [f"client crashed: {type(e).__name__}: {e}"], "ended": time.monotonic(),
                     "cpu_s": 0.0})


def run_clients(url: str, code: str, total: int, kind: str = "minimal") -> dict:
    """Submit `total` jobs from CLIENTS processes at once; the rate counts from their common start."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(CLIENTS + 1), context.Queue()
    processes = [context.Process(target=client_submits, args=(url, code, first, count, barrier, results, kind))
                 for first, count in shares(total, CLIENTS)]
    for process in processes:
        process.start()
    try:
        barrier.wait(timeout=120)
        started = time.monotonic()
        outcomes = [results.get(timeout=120 + total) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
    ids = {job_id: value for outcome in outcomes for job_id, value in outcome["ids"].items()}
    span_s = max(outcome["ended"] for outcome in outcomes) - started
    return {"inputs": ids, "errors": [e for outcome in outcomes for e in outcome["errors"]], "clients": CLIENTS,
            "client": kind, "jobs": total, "accepted": len(ids), "span_s": span_s, "jobs_per_s": len(ids) / span_s,
            "client_cpu_ms_per_job": sum(o["cpu_s"] for o in outcomes) * 1000 / max(1, len(ids))}


def submitted_or_fail(submitted: dict) -> dict:
    if submitted["errors"]:
        raise BenchError(f"{len(submitted['errors'])} of {submitted['jobs']} submissions refused; first: "
                         f"{submitted['errors'][:3]}")
    return submitted


# --- sless -----------------------------------------------------------------------------------


@contextlib.contextmanager
def running_stack(log_dir: Path, workers: int, **settings):
    """A fresh daemon (and pool of `workers`) on the bench Redis db, at sless's default settings
    but for `settings` (Settings field names).

    Stack's test defaults shorten the retry backoff; the default is put back here.
    """
    settings.setdefault("retry_backoff_s", Settings.from_env({}).retry_backoff_s)
    stack = Stack(log_dir, workers=workers, redis_url=REDIS_URL, **settings)
    try:
        yield stack.start()
    finally:
        stack.stop()
        drop_sless_keys(stack)


def drop_sless_keys(stack: Stack) -> None:
    """Whatever the stack left in Redis: queued messages, the queue, its registries."""
    connection = bench_redis()
    rq.Queue(stack.queue_name, connection=connection).delete(delete_jobs=True)
    drop_keys(connection, stack.queue_name)
    connection.delete(SLESS_MARKER)


def sless_terminal(stack: Stack) -> int:
    """Jobs whose attempts ended for good, counted for next to nothing: every worker adds each
    settle to totals in Redis, in the pipeline that announces it (metrics.py), and this reads
    them in one call. Counting settle events in MongoDB cost FerretDB 0.55 s of CPU per count
    at 2,000 jobs (it decodes every event to filter them), taken from the jobs still running
    at the end of a drain. The drain's figures still come from every job's record in MongoDB
    (`sless_outcome`), which checks each one.
    """
    ended = stack.redis().hgetall(metrics_key(stack.queue_name, ENDED))
    return sum(int(count) for field, count in ended.items() if field.decode().partition("|")[0] in TERMINAL)


def sless_records(stack: Stack) -> dict[str, dict]:
    """Every job of the stack as its record says now."""
    from sless_daemon.store import OutcomeStore, connect_mongo

    store = OutcomeStore(connect_mongo(stack.env["SLESS_MONGO_URL"]), stack.db_name)
    return {job["_id"]: job for job in store.all_jobs(full=True)}


def sless_outcome(stack: Stack, inputs: dict[str, int], wall_s: float) -> dict:
    """Check every job's outcome and summarise the drain from its documents' start and end times."""
    docs = sless_records(stack)
    starts, ends, problems, failed, retried = [], [], [], 0, 0
    for job_id, value in inputs.items():
        doc = docs.get(job_id, {})
        retried += doc.get("attempts", 0) > 1
        if doc.get("state") != "completed":
            failed += 1
            problems.append(f"{job_id}: {doc.get('state')} {doc.get('error')}")
        elif json.loads(doc["result_json"]) != value * 2:
            problems.append(f"{job_id}: result {doc['result_json']}")
        if doc.get("started_at") and doc.get("finished_at"):
            starts.append(epoch_s(doc["started_at"]))
            ends.append(epoch_s(doc["finished_at"]))
    return {**drain_summary(len(inputs), starts, ends, wall_s, problems, failed), "retried": retried}


def sless_drain(stack: Stack, function: str, count: int, workers: int) -> dict:
    """Submit `count` jobs (8 clients) with no worker, then start W workers and let them drain."""
    submitted = submitted_or_fail(run_clients(stack.url, tasks.SLESS_CODE[function], count))
    started = time.monotonic()
    stack.workers = workers
    stack.start_pool()
    wait_for_count(lambda: sless_terminal(stack), len(submitted["inputs"]), SLESS_POLL_S,
                   lambda: stack.pool.poll() is None, "sless")
    wall_s = time.monotonic() - started
    return {**sless_outcome(stack, submitted["inputs"], wall_s), "submit_jobs_per_s": submitted["jobs_per_s"]}


def keep_alive(url: str) -> http.client.HTTPConnection:
    """One keep-alive connection to the daemon, as the submit clients use (`client_submits`)."""
    address = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(address.hostname, address.port, timeout=120)


def post_json(connection: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict]:
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    answer = connection.getresponse()
    return answer.status, json.loads(answer.read())


def sless_call(connection: http.client.HTTPConnection, function: str, value: int) -> float:
    """Milliseconds of one `POST /execute` (the daemon waits for the outcome).

    The client is the standard library's `http.client` on a keep-alive connection, like the
    submit clients': `requests` adds about 0.85 ms per call of its own (measured against
    `GET /`: 1.18 ms p50 with a `requests.Session`, 0.35 ms with `http.client`), which
    would time the client library rather than sless.
    """
    started = time.perf_counter()
    status, body = post_json(connection, "/execute", {"code": tasks.SLESS_CODE[function], "input": value})
    elapsed_ms = (time.perf_counter() - started) * 1000
    if status != 200 or body.get("state") != "completed" or body.get("result") != value * 2:
        raise BenchError(f"/execute answered {status}: {json.dumps(body)[:300]}")
    return elapsed_ms


def sless_rss(stack: Stack) -> dict:
    """Resident MiB of each worker, and of each warm sandbox below it (bwrap and python, summed)."""
    time.sleep(1.0)  # the spare sandboxes are started once the last jobs are recorded
    table = process_table()
    workers = stack.worker_pids()
    sandboxes = [mib(tree_kib(table, child)) for pid in workers for child in children(table, pid)]
    return {"worker": [mib(table.get(pid, (0, 0))[1]) for pid in workers], "warm_sandbox": sandboxes}


def drain(system: str, function: str, workers: int, args) -> dict:
    """One drain of --jobs queued jobs by W workers of `system`."""
    if system != "sless":
        return rq_drain(system, function, args.jobs, workers, args.log_dir)
    with running_stack(args.log_dir, workers=0) as stack:
        return sless_drain(stack, function, args.jobs, workers)


def measure_throughput(rec: Recorder, function: str, workers: int, systems: list[str], args) -> None:
    """--rounds drains per system, the order reversed every other round (A B sless, sless B A, ...).

    These machines change speed by a third within minutes (the cpu10 loop took 9.1 to
    15.6 ms across session 5's runs), so one drain per system measured minutes apart
    compares the minutes as much as the systems. Alternating rounds puts every system
    in the same minutes; each round's ratios are kept with the mean over rounds.
    """
    def drain_of(system: str):
        def measure() -> dict:
            drained = drain(system, function, workers, args)
            rec.check_jobs(f"{system} {function} W={workers} throughput ({args.jobs} jobs)", drained)
            return drained
        return measure

    drains = alternating_rounds(rec, {system: drain_of(system) for system in systems}, args.rounds,
                                f"{function} W={workers} throughput")
    for system, rounds in drains.items():
        rec.slot(function, workers, system)["throughput"] = mean_over(rounds, ("jobs_per_s", "wall_s"))


def alternating_rounds(rec: Recorder, runs: dict, rounds: int, label: str) -> dict[str, list]:
    """Each of `runs` (name -> measure) `rounds` times, the order reversed every other round:
    name -> the values of its rounds (None where one failed, recorded by `rec`)."""
    values: dict[str, list] = {name: [] for name in runs}
    for index in range(rounds):
        for name in runs if index % 2 == 0 else list(runs)[::-1]:
            values[name].append(rec.attempt(f"{label}: {name}, round {index + 1}", runs[name]))
    return values


def mean_over(rounds: list | None, keys: tuple, also: tuple = ()) -> dict | None:
    """The mean of `keys` over the rounds, `also` from the first, and every round; None if one failed."""
    if not rounds or any(r is None for r in rounds):
        return None
    return {**{key: rounds[0][key] for key in also}, **{key: statistics.fmean(r[key] for r in rounds) for key in keys},
            "rounds": rounds}


@contextlib.contextmanager
def rq_caller(kind: str, function: str, workers: int, args):
    """W idle `rq worker`s of `kind`; yields (one call, the workers' RSS)."""
    queue = new_rq_queue(kind)
    try:
        with RqWorkers(kind, queue, workers, burst=False, log_dir=args.log_dir) as pool:
            pool.wait_registered()

            def rss() -> dict:
                table = process_table()
                return {"worker": [mib(table.get(pid, (0, 0))[1]) for pid in pool.pids()]}

            yield lambda value: rq_call(queue, function, value), rss
    finally:
        drop_keys(queue.connection, queue.name)


@contextlib.contextmanager
def sless_caller(function: str, workers: int, args):
    """A fresh stack with W idle workers; yields (one `POST /execute` call, the RSS)."""
    with running_stack(args.log_dir, workers=workers) as stack:
        connection = keep_alive(stack.url)
        try:
            yield lambda value: sless_call(connection, function, value), lambda: sless_rss(stack)
        finally:
            connection.close()


def measure_latency(rec: Recorder, function: str, workers: int, systems: list[str], args) -> None:
    """--latency-runs sequential calls per system, every system up at once and idle between
    calls, the calls taken in blocks of LATENCY_BLOCK in turn (A B sless, B sless A, ...), so
    all systems meet the same minutes (see measure_throughput). Then the RSS of each idle pool."""
    with contextlib.ExitStack() as up:
        callers = {}
        for system in systems:
            opened = rec.attempt(f"{system} {function} W={workers} idle workers",
                                 lambda: up.enter_context(sless_caller(function, workers, args) if system == "sless"
                                                          else rq_caller(system, function, workers, args)))
            if opened:
                callers[system] = opened
        label = f"{function} W={workers} latency ({args.latency_runs} calls each, interleaved)"
        samples = rec.attempt(label, lambda: interleaved_calls({s: c[0] for s, c in callers.items()},
                                                               args.latency_runs))
        for system, (_, rss) in callers.items():
            slot = rec.slot(function, workers, system)
            slot["latency"] = latency_summary(samples[system]) if samples else None
            slot["rss_mib"] = rec.attempt(f"{system} {function} W={workers} RSS", rss)


def interleaved_calls(calls: dict, runs: int) -> dict[str, list[float]]:
    """Milliseconds of `runs` calls to each system, in rotating blocks; WARMUP_CALLS first, uncounted.

    This process's garbage collector is off meanwhile, as `timeit` turns it off: a full
    collection here (12-20 ms) would be timed as part of whichever system's call it fell in.
    """
    names = list(calls)
    for name in names:
        for value in range(WARMUP_CALLS):
            calls[name](value)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with collector_off():
        for block, first in enumerate(range(0, runs, LATENCY_BLOCK)):
            turn = names[block % len(names):] + names[:block % len(names)]
            for name in turn:
                values = range(WARMUP_CALLS + first, WARMUP_CALLS + min(runs, first + LATENCY_BLOCK))
                samples[name] += [calls[name](value) for value in values]
    return samples


@contextlib.contextmanager
def collector_off():
    """This process's garbage collector off while timing, then back as it was (as `timeit` does)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def sless_submit_rate(args, kind: str) -> dict:
    """`POST /submit` from 8 client processes to a daemon with no workers."""
    with running_stack(args.log_dir, workers=0) as stack:
        submitted = submitted_or_fail(run_clients(stack.url, tasks.SLESS_CODE["double"], args.submit_jobs, kind))
    return {k: v for k, v in submitted.items() if k != "inputs"}


def submit_rate(rec: Recorder, args) -> dict:
    """sless's submit rate next to direct enqueue from one process, --rounds times each in
    alternating order (see measure_throughput); then `http.client` clients for comparison.
    Each figure is the mean over its rounds; the ratio is the mean's."""
    runs = {"minimal": lambda: sless_submit_rate(args, "minimal"), "enqueue": lambda: rq_enqueue_rate(args.submit_jobs)}
    if "sless" not in args.only:
        del runs["minimal"]
    rounds = alternating_rounds(rec, runs, args.rounds, "submit rate")
    sless = mean_over(rounds.get("minimal"), ("jobs_per_s", "client_cpu_ms_per_job"), also=("accepted",))
    direct = mean_over(rounds.get("enqueue"), ("jobs_per_s",), also=("jobs",))
    stdlib = (rec.attempt("sless submit rate (http.client)", lambda: sless_submit_rate(args, "http.client"))
              if "sless" in args.only else None)
    return {"sless_submit": sless, "rq_enqueue": direct, "sless_submit_http_client": stdlib,
            "ratio": ratio(get(sless, "jobs_per_s"), get(direct, "jobs_per_s"))}


def slice_rates(offsets_s: list[float], size: int) -> list[dict]:
    """Jobs/s of each consecutive `size`-job slice of the finish times (from the first start)."""
    slices = []
    for index in range(len(offsets_s) // size):
        begin = offsets_s[index * size - 1] if index else 0.0
        end = offsets_s[(index + 1) * size - 1]
        slices.append({"slice": index + 1, "jobs": size, "span_s": end - begin,
                       "jobs_per_s": size / (end - begin) if end > begin else None})
    return slices


def long_drain(args) -> dict:
    """A long drain: does the cost per job stay flat as the jobs collection grows?"""
    with running_stack(args.log_dir, workers=0) as stack:
        drained = sless_drain(stack, "double", args.long_jobs, args.long_workers)
    size = 1000 if args.long_jobs >= 2000 else max(1, args.long_jobs // 5)
    slices = slice_rates(drained["finish_offsets_s"], size)
    first, last = slices[0]["jobs_per_s"], slices[-1]["jobs_per_s"]
    return {"workers": args.long_workers, "drain": drained, "slice_jobs": size, "slices": slices,
            "last_over_first": ratio(last, first)}


# --- the stages of one job ---------------------------------------------------------------------


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`parse;dur=0.2, insert;dur=1.1` -> {"parse": 0.2, "insert": 1.1} (milliseconds)."""
    found = {}
    for metric in (header or "").split(","):
        name, *params = [part.strip() for part in metric.split(";")]
        for param in params:
            key, _, value = param.partition("=")
            with contextlib.suppress(ValueError):
                if key.strip() == "dur" and name:
                    found[name] = float(value)
    return found


def span_ms(timings: dict, start: str, end: str) -> float | None:
    a, b = timings.get(start), timings.get(end)
    return (b - a) * 1000 if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def job_stages(round_trip_ms: float, server: dict, timings: dict, sent: float, seen: float) -> dict:
    """Milliseconds per stage; None where the daemon or worker did not report the times."""
    server_ms = [server.get(k) for k in ("parse", "insert", "enqueue")]
    recorded = timings.get("recorded_at")
    return {
        "HTTP accept": round_trip_ms - sum(server_ms) if None not in server_ms else None,
        "parse": server.get("parse"), "MongoDB insert": server.get("insert"), "enqueue": server.get("enqueue"),
        "dequeue wait": span_ms(timings, "enqueued_at", "dequeued_at"),
        CLAIM_STAGE: span_ms(timings, "dequeued_at", "claimed_at"),
        "sandbox ready": span_ms(timings, "dequeued_at", "sandbox_ready_at"),
        "hand-off to code": span_ms(timings, "sandbox_ready_at", "code_started_at"),
        "user code": span_ms(timings, "code_started_at", "code_ended_at"),
        "outcome write": span_ms(timings, "code_ended_at", "recorded_at"),
        "visible": (seen - recorded) * 1000 if isinstance(recorded, (int, float)) else None,
        "total seen by client": (seen - sent) * 1000,
    }


def staged_job(stack: Stack, session: requests.Session, value: int) -> dict:
    """Submit one job, poll its status every 1 ms until it ends, and read its recorded times."""
    sent, started = time.time(), time.perf_counter()
    answer = session.post(stack.url + "/submit", json={"code": tasks.SLESS_CODE["double"], "input": value}, timeout=30)
    round_trip_ms = (time.perf_counter() - started) * 1000
    if answer.status_code != 202:
        raise BenchError(f"/submit answered {answer.status_code}: {answer.text[:200]}")
    job_id = answer.json()["jobId"]
    deadline = time.monotonic() + STALL_S
    while (state := (doc := session.get(f"{stack.url}/status/{job_id}", timeout=10).json())["state"]) not in TERMINAL:
        if time.monotonic() > deadline:
            raise BenchError(f"job {job_id} still {state} after {STALL_S:.0f} s")
        time.sleep(STAGE_POLL_S)
    seen = time.time()
    if state != "completed":
        raise BenchError(f"job {job_id} ended {state}")
    timings = doc.get("timings") or {}
    return job_stages(round_trip_ms, parse_server_timing(answer.headers.get("Server-Timing")), timings, sent, seen)


def stage_breakdown(args) -> dict:
    """Median of each stage over sequential jobs on one idle worker."""
    with running_stack(args.log_dir, workers=1) as stack:
        session = requests.Session()
        runs = [staged_job(stack, session, i) for i in range(args.stage_runs + WARMUP_CALLS)][WARMUP_CALLS:]
    medians = {}
    for stage in STAGES:
        values = [run[stage] for run in runs if run[stage] is not None]
        medians[stage] = {"median_ms": statistics.median(values) if values else None, "runs": len(values)}
    return {"stages": medians, "runs": runs}


# --- sandbox start-up --------------------------------------------------------------------------


def sandbox_start_measures(runs: int) -> dict:
    """bench/sandbox_start.py's measures. Runs in a child process: they make their process a
    subreaper that collects every child, which would steal this process's stack processes."""
    from bench import sandbox_start as s

    return {name: {**s.summary(values), "samples_ms": [round(v, 3) for v in values]}
            for name, values in s.measures(runs).items()}


def sandbox_start(runs: int) -> dict:
    if os.geteuid() != 0:
        log.warning("not root: the sandbox runs without its slot uid and cgroups, unlike a root worker")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(sandbox_start_measures, runs).result()


# --- the report --------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def get(tree: dict | None, *path):
    """tree[path[0]][path[1]]...; None where anything on the way is missing."""
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def round_ratios(per_w: dict, w: int, base: str) -> list[float | None]:
    """sless/base in each round (the two drains of one round ran within a minute of each other)."""
    ours, theirs = (get(per_w, str(w), s, "throughput", "rounds") or [] for s in ("sless", base))
    return [ratio(a["jobs_per_s"], b["jobs_per_s"]) for a, b in zip(ours, theirs)]


def throughput_table(per_w: dict, workers: list[int]) -> str:
    rows = []
    for w in workers:
        rate = {s: get(per_w, str(w), s, "throughput", "jobs_per_s") for s in SYSTEMS}
        wall = "/".join(fmt(get(per_w, str(w), s, "throughput", "wall_s")) for s in SYSTEMS)
        ratios = [fmt(ratio(rate["sless"], rate[base]), 2, "x") for base in ("A", "B")]
        rounds = ", ".join(fmt(r, 2, "x") for r in round_ratios(per_w, w, "A")) or "n/a"
        rows.append([str(w)] + [fmt(rate[s]) for s in SYSTEMS] + ratios + [rounds, wall])
    return table(["W", "A jobs/s", "B jobs/s", "sless jobs/s", "sless/A", "sless/B", "sless/A by round",
                  "wall s A/B/sless"], rows)


def latency_table(per_w: dict, workers: list[int]) -> str:
    rows = []
    for w in workers:
        cells = [str(w)]
        for s in SYSTEMS:
            cells.append("/".join(fmt(get(per_w, str(w), s, "latency", f"{p}_ms"), 2) for p in ("p50", "p95", "p99")))
        p50 = {s: get(per_w, str(w), s, "latency", "p50_ms") for s in SYSTEMS}
        cells += [fmt(ratio(p50["sless"], p50["A"]), 2, "x"),
                  fmt(ratio(get(per_w, str(w), "sless", "latency", "p99_ms"), p50["sless"]), 2, "x")]
        rows.append(cells)
    return table(["W", "A p50/p95/p99 ms", "B p50/p95/p99 ms", "sless p50/p95/p99 ms", "sless/A p50",
                  "sless p99/p50"], rows)


def mean_of(values: list[float] | None) -> float | None:
    return statistics.fmean(values) if values else None


def rss_table(per_w: dict, workers: list[int]) -> str:
    rows = []
    for w in workers:
        cells = [str(w)] + [fmt(mean_of(get(per_w, str(w), s, "rss_mib", "worker"))) for s in SYSTEMS]
        sandboxes = get(per_w, str(w), "sless", "rss_mib", "warm_sandbox")
        rows.append(cells + [fmt(mean_of(sandboxes)), str(len(sandboxes)) if sandboxes is not None else "n/a"])
    return table(["W", "A worker MiB", "B worker MiB", "sless worker MiB", "sless warm sandbox MiB",
                  "warm sandboxes"], rows)


def targets(data: dict, workers: list[int]) -> list[dict]:
    """The issue's targets, each with the measured ratio and whether it is met."""
    found = []

    def add(where: str, target: str, measured: float | None, met) -> None:
        found.append({"where": where, "target": target, "measured": measured,
                      "met": None if measured is None else bool(met(measured))})

    for function, per_w in data["functions"].items():
        for w in workers:
            rate = {s: get(per_w, str(w), s, "throughput", "jobs_per_s") for s in SYSTEMS}
            lat = {s: get(per_w, str(w), s, "latency") or {} for s in SYSTEMS}
            where = f"{function} W={w}"
            add(where, "throughput >= 2x A", ratio(rate["sless"], rate["A"]), lambda r: r >= 2)
            add(where, "p50 <= 0.5x A", ratio(lat["sless"].get("p50_ms"), lat["A"].get("p50_ms")), lambda r: r <= 0.5)
            add(where, "p99 <= 2x sless p50", ratio(lat["sless"].get("p99_ms"), lat["sless"].get("p50_ms")),
                lambda r: r <= 2)
            add(where, "stretch: throughput >= 0.8x B", ratio(rate["sless"], rate["B"]), lambda r: r >= 0.8)
    add("submit", "submit >= 0.5x enqueue", get(data, "submit_rate", "ratio"), lambda r: r >= 0.5)
    return found


def code_ms(data: dict, function: str) -> float:
    """The user code's own milliseconds in sless's interpreter (the trivial function's are ~0)."""
    return (get(data, "meta", "cpu10_ms_sandbox_python") or 0.0) if function == "cpu10" else 0.0


def budgets(data: dict, workers: list[int]) -> list[dict]:
    """What the throughput and p50 targets leave for everything but the user code, per job.

    Throughput: W workers on C cores run at most min(W, C) jobs' code at once, so at 2x
    A's rate each of those lanes has min(W, C) * 1000 / (2 * A) ms per job, of which
    the code takes its own. Latency: half A's p50, less the code. Next to each, what
    B (the function called in a worker that does nothing else) and sless took in this
    run, worked out the same way: where the allowance is below B's, the target asks
    for less than plain RQ spends without a fork, a sandbox or a record.
    """
    rows = []
    for function, per_w in data["functions"].items():
        code = code_ms(data, function)
        for w in workers:
            lanes = min(w, data["meta"]["cpus"] or 1)
            rate = {s: get(per_w, str(w), s, "throughput", "jobs_per_s") for s in SYSTEMS}
            p50 = {s: get(per_w, str(w), s, "latency", "p50_ms") for s in SYSTEMS}
            per_job = lambda r: lanes * 1000 / r - code if r else None  # noqa: E731
            rows.append({"function": function, "workers": w, "code_ms": code,
                         "throughput_needed": 2 * rate["A"] if rate["A"] else None,
                         "lane_ms_allowed": per_job(2 * rate["A"] if rate["A"] else None),
                         "lane_ms_b": per_job(rate["B"]), "lane_ms_sless": per_job(rate["sless"]),
                         "p50_needed_ms": p50["A"] / 2 if p50["A"] else None,
                         "latency_ms_allowed": p50["A"] / 2 - code if p50["A"] else None,
                         "latency_ms_b": p50["B"] - code if p50["B"] else None,
                         "latency_ms_sless": p50["sless"] - code if p50["sless"] else None})
    return rows


def budgets_table(rows: list[dict]) -> str:
    return table(["function W", "code ms", "2x A jobs/s", "ms per job per lane beyond the code: allowed / B / sless",
                  "0.5x A p50 ms", "p50 ms beyond the code: allowed / B / sless"],
                 [[f"{r['function']} W={r['workers']}", fmt(r["code_ms"], 2), fmt(r["throughput_needed"]),
                   " / ".join(fmt(r[k], 2) for k in ("lane_ms_allowed", "lane_ms_b", "lane_ms_sless")),
                   fmt(r["p50_needed_ms"], 2),
                   " / ".join(fmt(r[k], 2) for k in ("latency_ms_allowed", "latency_ms_b", "latency_ms_sless"))]
                  for r in rows])


def targets_table(found: list[dict]) -> str:
    verdict = {True: "met", False: "not met", None: "n/a"}
    return table(["where", "target", "measured", "verdict"],
                 [[t["where"], t["target"], fmt(t["measured"], 2, "x"), verdict[t["met"]]] for t in found])


def submit_table(submit: dict | None) -> str:
    sless, direct, stdlib = (get(submit, key) for key in ("sless_submit", "rq_enqueue", "sless_submit_http_client"))
    return table(["path", "jobs", "jobs/s", "client CPU ms per job"], [
        [f"sless POST /submit, {CLIENTS} clients (MinimalHttp)", fmt(get(sless, "accepted"), 0),
         rates(sless), fmt(get(sless, "client_cpu_ms_per_job"), 3)],
        ["RQ Queue.enqueue, 1 process", fmt(get(direct, "jobs"), 0), rates(direct), ""],
        ["ratio sless/enqueue", "", fmt(get(submit, "ratio"), 2, "x"), ""],
        [f"for comparison: sless POST /submit, {CLIENTS} clients (http.client)", fmt(get(stdlib, "accepted"), 0),
         fmt(get(stdlib, "jobs_per_s")), fmt(get(stdlib, "client_cpu_ms_per_job"), 3)]])


def rates(figures: dict | None) -> str:
    """The mean rate, and each round's after it."""
    each = [r["jobs_per_s"] for r in get(figures, "rounds") or []]
    return fmt(get(figures, "jobs_per_s")) + (f" ({', '.join(fmt(r) for r in each)})" if len(each) > 1 else "")


def long_drain_text(long: dict | None) -> str:
    if not long:
        return "not run (or failed; see errors)"
    rows = [[str(s["slice"]), str(s["jobs"]), fmt(s["span_s"], 2), fmt(s["jobs_per_s"])] for s in long["slices"]]
    return (f"{long['drain']['jobs']} jobs, W={long['workers']}; last slice / first slice: "
            f"{fmt(long['last_over_first'], 2, 'x')}\n\n" + table(["slice", "jobs", "s", "jobs/s"], rows))


def stages_table(stages: dict | None) -> str:
    if not stages:
        return "not run (or failed; see errors)"
    return table(["stage", "median ms", "runs with data"],
                 [[name, fmt(row["median_ms"], 2), str(row["runs"])] for name, row in stages["stages"].items()])


def sandbox_table(rows: dict | None) -> str:
    if not rows:
        return "not run (or failed; see errors)"
    base = next(iter(rows.values()))["p50_ms"]
    return table(["measure", "p50 ms", "p95 ms", "p50 / plain start"],
                 [[name, fmt(r["p50_ms"], 2), fmt(r["p95_ms"], 2), fmt(ratio(r["p50_ms"], base), 2, "x")]
                  for name, r in rows.items()])


def report(data: dict, args) -> str:
    meta = data["meta"]
    parts = [f"# sless vs plain RQ ({meta['started']}, {meta['cpus']} CPUs, load {meta['load_before']})",
             f"cpu10 loop: {fmt(meta['cpu10_ms_here'], 2)} ms in {sys.executable}, "
             f"{fmt(meta['cpu10_ms_sandbox_python'], 2)} ms in the sandbox's {SANDBOX_PYTHON}"]
    for function, per_w in data["functions"].items():
        parts += [f"## {function}: throughput, draining {args.jobs} queued jobs (mean of {args.rounds} rounds, "
                  "the systems' order reversed every other round)", throughput_table(per_w, args.workers),
                  f"## {function}: end-to-end latency, {args.latency_runs} sequential submit-and-wait calls "
                  f"(all systems up, in turns of {LATENCY_BLOCK} calls)",
                  latency_table(per_w, args.workers)]
    first_name, first = next(iter(data["functions"].items()), ("none", {}))
    parts += [f"## Submit rate ({args.submit_jobs} jobs, no workers; mean of {args.rounds} rounds, alternating)",
              submit_table(data.get("submit_rate")),
              f"## RSS, mean per process, idle ({first_name}, after the latency calls)",
              rss_table(first, args.workers),
              "## Long drain (sless, double)", long_drain_text(data.get("long_drain")),
              f"## Stages of one sless job (median of {args.stage_runs})", stages_table(data.get("stages")),
              f"## Sandbox start ({args.sandbox_runs} runs)", sandbox_table(data.get("sandbox_start")),
              "## Targets", targets_table(data["targets"]),
              "## What the targets leave per job, beyond the user code (bench/compare.py: budgets)",
              budgets_table(budgets(data, args.workers))]
    errors = data["errors"]
    parts.append("## Errors\n" + ("\n".join(f"- {e['measure']}: {e['error']}" for e in errors) if errors else "none"))
    return "\n\n".join(parts) + "\n"


# --- the run -------------------------------------------------------------------------------------


def meta() -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "python": sys.executable,
            "python_version": platform.python_version(), "rq": rq.__version__, "redis_url": REDIS_URL,
            "commit": commit, "root": os.geteuid() == 0, "cpu_loops": tasks.CPU_LOOPS,
            "cpu10_ms_here": tasks.cpu_loop_ms_here(), "cpu10_ms_sandbox_python": sandbox_cpu_ms()}


def sandbox_cpu_ms() -> float | None:
    """The cpu10 loop in the interpreter the sandbox runs, when it can be run here."""
    try:
        return tasks.cpu_loop_ms(SANDBOX_PYTHON)
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        log.warning("cannot time the cpu10 loop in %s: %s", SANDBOX_PYTHON, e)
        return None


def run(args) -> dict:
    rec = Recorder()
    rec.data["meta"] = meta()
    if "sless" in args.only and args.sandbox_runs:
        rec.data["sandbox_start"] = rec.attempt("sandbox start", lambda: sandbox_start(args.sandbox_runs))
    rec.data["submit_rate"] = submit_rate(rec, args)
    for function in args.functions:
        for w in args.workers:
            systems = [s for s in SYSTEMS if s in args.only]
            measure_throughput(rec, function, w, systems, args)
            measure_latency(rec, function, w, systems, args)
    if "sless" in args.only and args.long_jobs:
        rec.data["long_drain"] = rec.attempt(f"long drain ({args.long_jobs} jobs)", lambda: long_drain(args))
        rec.check_jobs("long drain", get(rec.data, "long_drain", "drain"))
    if "sless" in args.only and args.stage_runs:
        rec.data["stages"] = rec.attempt("stage breakdown", lambda: stage_breakdown(args))
    rec.data["targets"] = targets(rec.data, args.workers)
    return rec.data


def csv_of(kind, allowed=None):
    """An argparse type: a comma-separated list of `kind`, each in `allowed` when given."""

    def parse(text: str) -> list:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if not values or (allowed and set(values) - set(allowed)):
            choices = f" of {', '.join(allowed)}" if allowed else ""
            raise argparse.ArgumentTypeError(f"expected a comma-separated list{choices}")
        return values

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=csv_of(int), default=[1, 2, 4], help="worker counts W (default 1,2,4)")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs drained for throughput")
    parser.add_argument("--rounds", type=int, default=2, help="drains per system, in alternating order")
    parser.add_argument("--latency-runs", type=int, default=300, help="sequential submit-and-wait calls")
    parser.add_argument("--submit-jobs", type=int, default=2000, help="jobs for the submit-rate comparison")
    parser.add_argument("--long-jobs", type=int, default=10000, help="jobs of the long sless drain; 0 skips it")
    parser.add_argument("--long-workers", type=int, default=2, help="workers for the long drain")
    parser.add_argument("--stage-runs", type=int, default=50, help="jobs for the stage breakdown; 0 skips it")
    parser.add_argument("--sandbox-runs", type=int, default=30, help="runs per sandbox start-up measure; 0 skips it")
    parser.add_argument("--only", type=csv_of(str, SYSTEMS), default=list(SYSTEMS), help="systems: A,B,sless")
    parser.add_argument("--functions", type=csv_of(str, tasks.SLESS_CODE), default=list(tasks.SLESS_CODE),
                        help="double,cpu10")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare.json")
    args = parser.parse_args(argv)
    if min(args.jobs, args.rounds, args.latency_runs, args.submit_jobs, *args.workers) < 1:
        parser.error("--jobs, --rounds, --latency-runs, --submit-jobs and --workers must be at least 1")
    return args


def other_interpreter() -> str | None:
    """Why this run would not compare like with like, or None.

    A and B run the function in this process's interpreter, sless in its sandbox's. On
    these machines `python3` is a pyenv build without profile-guided optimisation, which
    runs the cpu10 loop about 1.2-1.5 times slower than Debian's /usr/bin/python3: every
    run before session 10 gave sless's user code that head start (BENCHMARKS.md).
    """
    if os.path.realpath(sys.executable) == os.path.realpath(SANDBOX_PYTHON):
        return None
    return (f"this runs on {os.path.realpath(sys.executable)}, but the sandbox runs user code on "
            f"{os.path.realpath(SANDBOX_PYTHON)}: A and B would run the same function on another interpreter. "
            "Run it as scripts/bench does (a virtual environment of the sandbox's interpreter).")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    args = parse_args(argv)
    if mismatch := other_interpreter():
        print(f"compare.py: {mismatch}", file=sys.stderr)
        return 2
    args.log_dir = Path(tempfile.mkdtemp(prefix="sless-bench-"))
    data = run(args)
    data["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, default=str))
    print(report(data, args))
    log.info("raw numbers in %s", args.out)
    if data["errors"]:
        log.error("%d measures failed; daemon, pool and RQ worker logs: %s", len(data["errors"]), args.log_dir)
        return 1
    shutil.rmtree(args.log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
