"""The benchmark's own logic (bench/compare.py): how it takes turns, what it computes, and its
minimal HTTP client against a real HTTP/1.1 server. No services needed."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import compare  # noqa: E402


def test_interleaved_calls_give_every_system_the_same_calls_in_rotating_turns():
    order = []
    calls = {name: (lambda value, name=name: order.append((name, value)) or float(value)) for name in ("A", "B", "s")}
    samples = compare.interleaved_calls(calls, runs=25)
    warm = compare.WARMUP_CALLS
    assert order[:3 * warm] == [(name, v) for name in ("A", "B", "s") for v in range(warm)]  # warm-up, uncounted
    assert {name: [int(x) for x in values] for name, values in samples.items()} == {
        name: list(range(warm, warm + 25)) for name in ("A", "B", "s")}
    turns = [name for i, (name, _) in enumerate(order[3 * warm:]) if i == 0 or order[3 * warm + i - 1][0] != name]
    assert turns == ["A", "B", "s", "B", "s", "A", "s", "A", "B"]  # blocks of 10, 10 and 5, first system rotating


def test_budgets_are_what_twice_a_and_half_its_p50_leave_beyond_the_code():
    data = {"meta": {"cpus": 2, "cpu10_ms_sandbox_python": 12.0}, "functions": {"cpu10": {
        "1": {"A": {"throughput": {"jobs_per_s": 25.0}, "latency": {"p50_ms": 30.0}},
              "B": {"throughput": {"jobs_per_s": 62.5}, "latency": {"p50_ms": 14.0}},
              "sless": {"throughput": {"jobs_per_s": 50.0}, "latency": {"p50_ms": 20.0}}},
        "4": {"A": {"throughput": {"jobs_per_s": 50.0}, "latency": {"p50_ms": 30.0}},
              "sless": {"throughput": {"jobs_per_s": 80.0}, "latency": None}}}}}
    one, four = compare.budgets(data, [1, 4])
    assert one["throughput_needed"] == 50.0
    assert one["lane_ms_allowed"] == pytest.approx(1000 / 50 - 12)  # one worker: one lane
    assert one["lane_ms_sless"] == pytest.approx(1000 / 50 - 12)
    assert (one["latency_ms_allowed"], one["latency_ms_sless"]) == (pytest.approx(3.0), pytest.approx(8.0))
    assert (one["lane_ms_b"], one["latency_ms_b"]) == (pytest.approx(1000 / 62.5 - 12), pytest.approx(2.0))
    assert four["lane_ms_allowed"] == pytest.approx(2 * 1000 / 100 - 12)  # four workers on two cores: two lanes
    assert four["lane_ms_sless"] == pytest.approx(2 * 1000 / 80 - 12)
    assert four["latency_ms_sless"] is None
    assert four["lane_ms_b"] is None  # B not measured


def test_a_run_on_another_interpreter_than_the_sandbox_s_is_refused(monkeypatch):
    monkeypatch.setattr(compare, "SANDBOX_PYTHON", sys.executable)
    assert compare.other_interpreter() is None
    monkeypatch.setattr(compare, "SANDBOX_PYTHON", "/bin/sh")  # a symlink: compared by where it leads
    why = compare.other_interpreter()
    assert why is not None and str(Path("/bin/sh").resolve()) in why and "scripts/bench" in why
    assert compare.main(["--workers", "1"]) == 2  # before anything is started


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers a POST with its path and body, keeping the connection open (HTTP/1.1)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = json.dumps({"path": self.path, "body": body.decode(), "type": self.headers["Content-Type"]}).encode()
        self.send_response(202 if self.path == "/submit" else 400)
        self.send_header("content-length", str(len(answer)))  # lower case, as Granian sends it
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", sorted(compare.CLIENT_KINDS))
def test_the_submit_clients_read_each_answer_whole_on_one_connection(echo_url, kind):
    client = compare.CLIENT_KINDS[kind](echo_url)
    try:
        answers = [client.post_json(path, json.dumps({"n": n}).encode()) for n, path in
                   enumerate(["/submit", "/other", "/submit"])]
    finally:
        client.close()
    assert [status for status, _ in answers] == [202, 400, 202]
    assert [json.loads(body) for _, body in answers] == [
        {"path": path, "body": json.dumps({"n": n}), "type": "application/json"}
        for n, path in enumerate(["/submit", "/other", "/submit"])]


def test_rounds_alternate_their_order_and_a_failed_round_fails_the_mean():
    order = []
    rec = compare.Recorder()
    runs = {name: (lambda name=name: order.append(name) or {"jobs_per_s": float(len(order)), "jobs": 5})
            for name in ("A", "B", "s")}
    rounds = compare.alternating_rounds(rec, runs, 3, "t")
    assert order == ["A", "B", "s", "s", "B", "A", "A", "B", "s"]
    assert compare.mean_over(rounds["A"], ("jobs_per_s",), also=("jobs",)) == {
        "jobs": 5, "jobs_per_s": (1 + 6 + 7) / 3, "rounds": rounds["A"]}
    failing = compare.alternating_rounds(rec, {"x": lambda: 1 / 0}, 2, "t")
    assert failing == {"x": [None, None]} and compare.mean_over(failing["x"], ("jobs_per_s",)) is None
    assert len(rec.data["errors"]) == 2  # each failed round is recorded
