"""Redis or MongoDB down or hung: clear 503s naming the dependency, nothing half-accepted."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from redis import Redis

from stack import free_port


@pytest.fixture
def hung_server():
    """A real TCP server that accepts connections and never answers (a hung dependency)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []
    stop = threading.Event()

    def accept_forever():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_redis_down_submit_is_503_and_leaves_no_record(make_stack):
    s = make_stack(workers=0, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    answer = s.post("/submit", {"code": "return 1"})
    assert answer.status_code == 503
    assert answer.json()["error"].startswith("Redis is unavailable")
    assert s.mongo_jobs().count_documents({}) == 0
    assert s.post("/execute", {"code": "return 1"}).status_code == 503
    assert s.get("/redis").status_code == 503
    health = s.get("/health")
    assert health.status_code == 503 and health.json()["redis"]["status"] == "down"
    assert s.get("/mongo").status_code == 200
    assert s.get("/").status_code == 200


def test_mongo_down_submit_is_503_and_enqueues_nothing(make_stack):
    s = make_stack(workers=0, mongo_url=f"mongodb://127.0.0.1:{free_port()}")
    answer = s.post("/submit", {"code": "return 1"})
    assert answer.status_code == 503
    assert answer.json()["error"].startswith("MongoDB is unavailable")
    assert s.redis().llen(f"rq:queue:{s.queue_name}") == 0
    assert s.get("/mongo").status_code == 503
    assert s.get("/status/" + "0" * 32).status_code == 503
    assert s.get("/redis").status_code == 200


def test_health_answers_within_a_second_when_dependencies_hang(make_stack, hung_server):
    s = make_stack(workers=0, redis_url=f"redis://127.0.0.1:{hung_server}/0",
                   mongo_url=f"mongodb://127.0.0.1:{hung_server}")
    for path in ("/redis", "/mongo", "/health"):
        started = time.monotonic()
        answer = s.get(path, timeout=5)
        took = time.monotonic() - started
        assert answer.status_code == 503, path
        assert took < 1.5, f"{path} took {took:.2f} s"  # the health deadline fired
    assert s.get("/", timeout=5).status_code == 200


def test_a_retry_asked_for_while_redis_refuses_writes_is_kept_and_runs_later(make_stack, private_redis):
    """`POST /retry` writes the reopening to MongoDB first: when Redis then refuses the
    message (full, under RQ's `noeviction`), the job is still accepted (202), noted as a
    retry due now, and the sweep sends it once Redis takes writes again. Redis neither
    restarts nor forgets anything here, so no full orphan scan comes to find the job."""
    s = make_stack(workers=1, redis_url=private_redis.url, sweep_interval_s=0.5)
    job_id = s.submit({"code": "def main(input, context):\n    if context['attempt'] == 1:\n"
                               "        raise ValueError('first')\n    return 'second'", "retries": 0})
    assert s.wait_terminal(job_id)["state"] == "failed"
    redis = Redis.from_url(private_redis.url)
    redis.config_set("maxmemory", 1)  # every write is refused: OOM
    try:
        answer = s.post(f"/retry/{job_id}", b"")
        assert answer.status_code == 202, answer.text
        assert answer.json()["state"] == "submitted"
        time.sleep(1.0)  # two sweeps meet a Redis that still refuses the message
    finally:
        redis.config_set("maxmemory", 0)
    doc = s.wait_terminal(job_id, timeout_s=30)
    assert doc["state"] == "completed" and doc["result"] == "second" and doc["attempts"] == 2


def test_a_503_says_the_job_was_not_accepted_only_for_a_new_job():
    from sless_daemon.app import unavailable_message

    assert "the job was not accepted" in unavailable_message("Redis", "/submit")
    assert "the job was not accepted" in unavailable_message("Redis", "/execute")
    for path in ("/retry/" + "0" * 32, "/cancel/" + "0" * 32):
        assert "may not have taken effect" in unavailable_message("Redis", path)
