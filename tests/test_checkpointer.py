"""scripts/ferretdb-checkpointer, beside a private FerretDB: it copies the write-ahead log back
into the database file between FerretDB's writes, keeps every document, and never brings a
dropped database back."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pymongo
import pytest

from stack import wait_until

CHECKPOINTER = Path(__file__).resolve().parent.parent / "scripts" / "ferretdb-checkpointer"
DOCUMENTS = 200  # a few hundred log pages: below the 1,000 at which FerretDB's SQLite checkpoints itself


@pytest.fixture
def start_checkpointer(private_mongo):
    started = []

    def start(every_s: float = 0.1) -> subprocess.Popen:
        command = [sys.executable, str(CHECKPOINTER), str(private_mongo.workdir), "--every", str(every_s)]
        started.append(subprocess.Popen(command))
        return started[-1]

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def test_the_log_goes_back_into_the_database_file_between_writes(private_mongo, start_checkpointer):
    client = pymongo.MongoClient(private_mongo.url, serverSelectionTimeoutMS=5000)
    events = client["checkpointed"]["events"]
    for n in range(DOCUMENTS):
        events.insert_one({"n": n, "payload": "x" * 300})
    database = private_mongo.workdir / "checkpointed.sqlite"
    written = database.stat().st_size
    time.sleep(1.0)
    assert database.stat().st_size == written  # FerretDB alone leaves them in the log

    start_checkpointer()
    wait_until(lambda: database.stat().st_size > written, 10, "the log copied back into the database file")
    written = database.stat().st_size
    for n in range(DOCUMENTS, 2 * DOCUMENTS):  # and again after its first checkpoint
        events.insert_one({"n": n, "payload": "x" * 300})
    wait_until(lambda: database.stat().st_size > written, 10, "the new log copied back too")
    assert events.count_documents({}) == 2 * DOCUMENTS
    assert sorted(doc["n"] for doc in events.find({}, {"n": 1})) == list(range(2 * DOCUMENTS))


def test_a_dropped_database_stays_dropped(private_mongo, start_checkpointer):
    """Drops and re-creations racing a checkpointer that goes round every 5 ms: no file comes
    back, no document of an earlier life shows, and the checkpointer goes on."""
    client = pymongo.MongoClient(private_mongo.url, serverSelectionTimeoutMS=5000)
    checkpointer = start_checkpointer(0.005)
    for round_ in range(20):  # dropped and made again while the checkpointer goes round
        client["dropped"]["events"].insert_many([{"n": n, "round": round_} for n in range(50)])
        client.drop_database("dropped")
        assert not (private_mongo.workdir / "dropped.sqlite").exists()
    time.sleep(0.5)
    assert not (private_mongo.workdir / "dropped.sqlite").exists()
    client["dropped"]["events"].insert_one({"n": "after"})
    assert [doc["n"] for doc in client["dropped"]["events"].find()] == ["after"]
    assert checkpointer.poll() is None  # still going


def test_refuses_a_directory_that_is_not_there(tmp_path):
    result = subprocess.run([sys.executable, str(CHECKPOINTER), str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "is not a directory" in result.stderr
