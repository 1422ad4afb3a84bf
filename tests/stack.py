"""Real sless stacks for tests: a daemon process and a worker pool process on real services.

Each stack gets its own MongoDB database and RQ queue name, so stacks started by
different tests never see each other's jobs. Redis runs on database TEST_REDIS_DB,
which the test session flushes; a developer's own data in database 0 is untouched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pymongo
import redis
import requests

REDIS_PORT = int(os.environ.get("SLESS_TEST_REDIS_PORT", "6379"))
MONGO_PORT = int(os.environ.get("SLESS_TEST_MONGO_PORT", "27017"))
TEST_REDIS_DB = 9
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/{TEST_REDIS_DB}"
MONGO_URL = f"mongodb://127.0.0.1:{MONGO_PORT}"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sless_command(*args: str) -> list[str]:
    """The CLI run with this interpreter (not a pyenv shim)."""
    return [sys.executable, "-m", "sless", *args]


def base_env(**settings: str) -> dict[str, str]:
    """The environment of a stack's processes: test services plus `SLESS_*` overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLESS_")}
    env.update({"SLESS_REDIS_URL": REDIS_URL, "SLESS_MONGO_URL": MONGO_URL, "SLESS_RETRY_BACKOFF_S": "0.2",
                "SLESS_SWEEP_INTERVAL_S": "1", "PYTHONUNBUFFERED": "1"})
    env.update({f"SLESS_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Stack:
    """A daemon and/or a worker pool started as real processes, with their logs kept."""

    def __init__(self, log_dir: Path, workers: int = 2, daemon: bool = True, pool_args: tuple[str, ...] = (),
                 **settings):
        self.port = free_port()
        self.db_name = f"sless_test_{uuid.uuid4().hex[:10]}"
        self.queue_name = settings.pop("queue_name", f"test-{uuid.uuid4().hex[:8]}")
        self.env = base_env(port=self.port, mongo_db=self.db_name, queue_name=self.queue_name, **settings)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.workers = workers
        self.with_daemon = daemon
        self.pool_args = pool_args
        self.daemon: subprocess.Popen | None = None
        self.pool: subprocess.Popen | None = None

    def start(self) -> Stack:
        if self.with_daemon:
            self.daemon = self._spawn("daemon", "daemon")
            wait_until(lambda: self._answers("/"), 15, "the daemon did not start")
        if self.workers:
            self.start_pool()
        return self

    def start_pool(self) -> None:
        self.pool = self._spawn("pool", "worker", "--count", str(self.workers), *self.pool_args)
        wait_until(lambda: len(self.live_workers()) == self.workers, 20, "the workers did not register")

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}-{self.port}.log", "ab")
        return subprocess.Popen(sless_command(*args), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)

    def _answers(self, path: str) -> bool:
        try:
            return requests.get(self.url + path, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}-{self.port}.log").read_text(errors="replace")

    # --- talking to it -------------------------------------------------------------
    def post(self, path: str, body, **kwargs) -> requests.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(self.url + path, data=data, timeout=kwargs.pop("timeout", 30), **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 10), **kwargs)

    def submit(self, job: dict) -> str:
        answer = self.post("/submit", job)
        assert answer.status_code == 202, answer.text
        return answer.json()["jobId"]

    def wait_terminal(self, job_id: str, timeout_s: float = 30) -> dict:
        doc = {}

        def done() -> bool:
            nonlocal doc
            doc = self.get(f"/status/{job_id}").json()
            return doc["state"] in ("completed", "failed", "cancelled")

        wait_until(done, timeout_s, f"job {job_id} did not finish")
        return doc

    def cli(self, *args: str, input: str | None = None, timeout: float = 60,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run the `sless` command against this stack; `env` adds or overrides variables."""
        env = {**self.env, "SLESS_URL": self.url, **(env or {})}
        return subprocess.run(sless_command(*args), env=env, capture_output=True, text=True, input=input,
                              timeout=timeout, cwd=ROOT)

    # --- looking inside ----------------------------------------------------------------
    def mongo_jobs(self) -> pymongo.collection.Collection:
        return pymongo.MongoClient(self.env["SLESS_MONGO_URL"], serverSelectionTimeoutMS=3000)[self.db_name]["jobs"]

    def records(self, job_ids: list[str]) -> list[dict]:
        """The jobs as their record in MongoDB says now (state derived from their events)."""
        from sless_daemon.store import OutcomeStore, connect_mongo

        store = OutcomeStore(connect_mongo(self.env["SLESS_MONGO_URL"]), self.db_name)
        return [store.get(job_id) for job_id in job_ids]

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["SLESS_REDIS_URL"])

    def live_workers(self) -> list[str]:
        import rq

        connection = self.redis()
        return [w.name for w in rq.Worker.all(connection=connection, queue=rq.Queue(self.queue_name,
                                                                                     connection=connection))]

    def worker_pids(self) -> list[int]:
        """PIDs of the pool's worker processes (children of the pool)."""
        out = subprocess.run(["pgrep", "-P", str(self.pool.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        for process in (self.pool, self.daemon):
            if process and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (self.pool, self.daemon):
            if process:
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        try:
            pymongo.MongoClient(self.env["SLESS_MONGO_URL"], serverSelectionTimeoutMS=2000).drop_database(self.db_name)
        except pymongo.errors.PyMongoError:
            pass  # a private server that is already gone


def wait_until(condition, timeout_s: float, message: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{message} within {timeout_s} s")
