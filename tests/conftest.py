"""Fixtures: real Redis and MongoDB-wire services, and real sless stacks on them.

The services must be running (`scripts/services start`, which `scripts/test` does);
a test session without them fails at once with that instruction, it never skips.
"""

from __future__ import annotations

import socket

import pytest
import redis

from services import PrivateFerretDB, PrivateRedis
from stack import MONGO_PORT, REDIS_PORT, REDIS_URL, Stack


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session", autouse=True)
def services():
    """Real Redis and FerretDB on loopback; the test Redis database starts empty."""
    missing = [name for name, port in (("Redis", REDIS_PORT), ("MongoDB-wire server", MONGO_PORT))
               if not port_open(port)]
    if missing:
        pytest.exit(f"{' and '.join(missing)} not running; start them with `scripts/services start`.", 3)
    redis.Redis.from_url(REDIS_URL).flushdb()
    yield
    redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def stack(logs_dir):
    """The shared stack: a daemon plus two workers on a queue of its own."""
    shared = Stack(logs_dir, workers=2).start()
    yield shared
    shared.stop()


@pytest.fixture
def make_stack(logs_dir):
    """Start extra stacks with their own settings; all are stopped after the test."""
    started = []

    def make(**kwargs) -> Stack:
        s = Stack(logs_dir, **kwargs)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def private_redis(tmp_path):
    """A Redis of the test's own, which it may stop, kill and restart (services.py)."""
    redis = PrivateRedis(tmp_path / "redis").start()
    yield redis
    redis.kill()


@pytest.fixture
def private_mongo(tmp_path):
    """A FerretDB of the test's own, with its data in the test's directory (services.py)."""
    mongo = PrivateFerretDB(tmp_path / "ferretdb").start()
    yield mongo
    mongo.kill()
