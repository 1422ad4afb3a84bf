"""Prometheus metrics: counted in Redis by whoever settles an attempt, shown by the daemon.

Workers run as many processes, on one host or several, and are not scraped. So each
settled attempt adds to a few Redis hashes, in the same pipeline that announces it
(queue.announce_settled: no extra round trip), and `GET /metrics` on any daemon reads
the totals of all of them (`RedisCollector`) with prometheus-client. The daemon's own
counts (jobs submitted) are ordinary prometheus-client counters of its process.

Histograms are kept as one counter per bucket (not cumulative) plus sum and count;
the collector makes them cumulative, as the text format wants.
"""

from __future__ import annotations

import logging

import redis
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .errors import DependencyDown

log = logging.getLogger(__name__)

ENDED = "ended"  # field "<state>|<error type>" -> attempts that ended so
HISTOGRAMS = {
    # name: (help, buckets in seconds)
    "duration": ("Wall time of each attempt, from its sandbox taking the request to its end.",
                 (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)),
    "queue_wait": ("Time from enqueue to a worker taking the message.",
                   (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 120, 600)),
    "sandbox_start": ("Time to have an attempt's sandbox made by the fork server (ahead of the job when spare).",
                      (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)),
}


def observations(event: dict) -> dict[str, float]:
    """The seconds a settle event (store.settle_event) says each histogram should observe."""
    changes = event.get("changes") or {}
    timings = changes.get("timings") or {}
    seen = {}
    if changes.get("duration_ms") is not None:
        seen["duration"] = changes["duration_ms"] / 1000
    if timings.get("enqueued_at") and timings.get("dequeued_at"):
        seen["queue_wait"] = max(0.0, timings["dequeued_at"] - timings["enqueued_at"])
    if timings.get("sandbox_start_ms") is not None:
        seen["sandbox_start"] = timings["sandbox_start_ms"] / 1000
    return seen


def metrics_key(queue_name: str, name: str) -> str:
    """The hash of one metric of one queue (stacks sharing a Redis keep their own)."""
    return f"sless:metrics:{queue_name}:{name}"


def bucket_of(seconds: float, buckets: tuple) -> str:
    return next((str(b) for b in buckets if seconds <= b), "+Inf")


def count_settled(pipe, queue_name: str, event: dict) -> None:
    """Add one settled attempt to the totals, on a pipeline the caller executes.

    The error type is the job's (why it ended): a cancelled attempt counts as
    cancelled even if its code had failed first.
    """
    error_type = ((event.get("changes") or {}).get("error") or event.get("error") or {}).get("type", "")
    pipe.hincrby(metrics_key(queue_name, ENDED), f"{event['state']}|{error_type}", 1)
    for name, seconds in observations(event).items():
        pipe.hincrby(metrics_key(queue_name, name), bucket_of(seconds, HISTOGRAMS[name][1]), 1)
        pipe.hincrbyfloat(metrics_key(queue_name, name), "sum", seconds)


class RedisCollector:
    """Reads the totals from Redis at each scrape, plus the queue's depth and live workers."""

    def __init__(self, queue):
        self.queue = queue

    def collect(self):
        try:
            raw = self._read()
        except (redis.RedisError, DependencyDown) as e:
            log.warning("metrics: Redis is unavailable (%s)", e)
            return
        ended = CounterMetricFamily("sless_attempts_ended", "Attempts that ended, by the state they left the job "
                                    "in and their error type (empty when none).", labels=["state", "error_type"])
        for field, count in sorted(raw["ended"].items()):
            state, _, error_type = field.decode().partition("|")
            ended.add_metric([state, error_type], int(count))
        yield ended
        for name, (help_text, buckets) in HISTOGRAMS.items():
            yield _histogram(f"sless_{name}_seconds", help_text, buckets, raw[name])
        yield GaugeMetricFamily("sless_queue_depth", "Messages waiting in the RQ queue now.", value=raw["depth"])
        yield GaugeMetricFamily("sless_live_workers", "Workers registered on the queue with a live heartbeat.",
                                value=raw["workers"])

    def _read(self) -> dict:
        connection = self.queue.connection
        with connection.pipeline(transaction=False) as pipe:
            pipe.hgetall(metrics_key(self.queue.name, ENDED))
            for name in HISTOGRAMS:
                pipe.hgetall(metrics_key(self.queue.name, name))
            ended, *histograms = pipe.execute()
        return {"ended": ended, **dict(zip(HISTOGRAMS, histograms)), "depth": self.queue.depth(),
                "workers": self.queue.live_workers()}


def _histogram(name: str, help_text: str, buckets: tuple, fields: dict) -> HistogramMetricFamily:
    counts = {k.decode(): v for k, v in fields.items()}
    cumulative, total = [], 0
    for bound in [str(b) for b in buckets] + ["+Inf"]:
        total += int(counts.get(bound, 0))
        cumulative.append((bound, total))
    return HistogramMetricFamily(name, help_text, buckets=cumulative, sum_value=float(counts.get("sum", 0)))


class DaemonMetrics:
    """The registry `GET /metrics` renders: the daemon's counters and the Redis totals."""

    def __init__(self, queue):
        self.registry = CollectorRegistry()
        self.submitted = Counter("sless_jobs_submitted", "Jobs this daemon accepted (POST /submit and /execute).",
                                 registry=self.registry)
        self.rejected = Counter("sless_requests_rejected", "Requests this daemon refused, by HTTP status.",
                                ["status"], registry=self.registry)
        self.registry.register(RedisCollector(queue))
