"""All daemon and worker settings in one frozen, validated object.

Every setting comes from the environment variable ``SLESS_`` + its upper-case
field name (``redis_url`` <- ``SLESS_REDIS_URL``). Units are in the names. A bad
value fails at start-up with a sentence, never on the first job.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigError


def _setting(default, low=None, high=None, doc: str = ""):
    """A dataclass field carrying its allowed range and a one-line description."""
    return field(default=default, metadata={"low": low, "high": high, "doc": doc})


@dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", doc="address the daemon binds; loopback unless told otherwise")
    port: int = _setting(3000, 1, 65535, doc="daemon TCP port")
    redis_url: str = _setting("redis://127.0.0.1:6379/0", doc="Redis holding the RQ queue")
    mongo_url: str = _setting("mongodb://127.0.0.1:27017", doc="MongoDB (or FerretDB) holding outcomes")
    mongo_db: str = _setting("sless", doc="database name; the `jobs` collection lives there")
    queue_name: str = _setting("compute-tasks", doc="RQ queue workers consume")
    api_token: str = _setting("", doc="when set, every endpoint but GET / and GET /openapi.json needs `Authorization: Bearer <token>`")
    # A job's document holds its code and input (body), stdout and stderr and the result: the
    # maxima below keep it under MongoDB's 16 MiB document limit (1 + 2 * 4 + 4 < 16).
    max_body_bytes: int = _setting(1 << 20, 1024, 2 << 20, doc="largest accepted request body")
    daemon_threads: int = _setting(16, 1, 512, doc="WSGI worker threads in the daemon")
    # Limits of one attempt: a default, and the largest a job may ask for (limits.py).
    default_timeout_s: float = _setting(5.0, 0.1, 3600, doc="wall-clock limit of one attempt")
    max_timeout_s: float = _setting(300.0, 0.1, 3600, doc="largest per-job timeout_s accepted")
    default_cpu_s: float = _setting(0.0, 0, 3600, doc="CPU-time limit; 0: one second more than timeout_s")
    max_cpu_s: float = _setting(3600.0, 0.1, 86400, doc="largest per-job cpu_s accepted")
    default_memory_mb: int = _setting(256, 16, 65536, doc="memory limit of one attempt")
    max_memory_mb: int = _setting(4096, 16, 65536, doc="largest per-job memory_mb accepted")
    default_processes: int = _setting(64, 4, 4096, doc="processes and threads one attempt may have at once")
    max_processes: int = _setting(1024, 4, 4096, doc="largest per-job processes accepted")
    default_open_files: int = _setting(64, 16, 65536, doc="open files per process of an attempt")
    max_open_files: int = _setting(4096, 16, 65536, doc="largest per-job open_files accepted")
    default_file_mb: int = _setting(64, 1, 65536, doc="largest file an attempt may write")
    max_file_mb: int = _setting(4096, 1, 65536, doc="largest per-job file_mb accepted")
    default_tmpfs_mb: int = _setting(64, 1, 65536, doc="size of the sandbox's writable /work (and /tmp)")
    max_tmpfs_mb: int = _setting(4096, 1, 65536, doc="largest per-job tmpfs_mb accepted")
    default_output_bytes: int = _setting(64 << 10, 1024, 4 << 20, doc="kept bytes of stdout and of stderr")
    max_output_bytes: int = _setting(4 << 20, 1024, 4 << 20, doc="largest per-job output_bytes accepted")
    default_result_bytes: int = _setting(1 << 20, 1024, 4 << 20, doc="largest JSON result of an attempt")
    max_result_bytes: int = _setting(4 << 20, 1024, 4 << 20, doc="largest per-job result_bytes accepted")
    max_output_flood_bytes: int = _setting(32 << 20, 1024, 1 << 30,
                                           doc="stdout+stderr bytes past which any attempt is killed (output_limit)")
    default_retries: int = _setting(2, 0, 100, doc="retries after a failed attempt")
    max_retries: int = _setting(10, 0, 100, doc="largest per-job retries accepted")
    retry_backoff_s: float = _setting(1.0, 0, 3600, doc="first retry delay; doubles each attempt")
    max_retry_backoff_s: float = _setting(60.0, 0, 86400, doc="cap on the retry delay")
    prewarm_sandbox: int = _setting(1, 0, 1, doc="1: build each worker's next attempt sandbox before its job arrives")
    sandbox_python: str = _setting("", doc="interpreter inside the sandbox; empty: /usr/bin/python3, else this one")
    sandbox_uid_base: int = _setting(60000, 1000, 4_000_000_000, doc="host uid of worker slot 0's sandboxes (root workers only)")
    execute_margin_s: float = _setting(10.0, 0, 3600, doc="how much longer than the timeout /execute waits by default")
    lease_s: float = _setting(10.0, 1, 3600, doc="a running attempt's lease; its worker renews it every fifth of it")
    claim_hold_s: float = _setting(0.05, 0, 60, doc="how long a worker holds a sandboxed attempt's claim back: a quiet attempt that ends sooner is claimed with its settle, in one write (0: claim at once; at most lease_s / 5)")
    sweep_interval_s: float = _setting(1.0, 0.1, 3600, doc="how often pools and daemons look for lost attempts and due retries")
    orphan_grace_s: float = _setting(5.0, 0.5, 3600, doc="how long a waiting job may be missing from Redis before it is enqueued again")
    orphan_scan_interval_s: float = _setting(5.0, 1, 86400, doc="how often messages taken but never claimed are looked for (two Redis reads)")
    orphan_full_scan_interval_s: float = _setting(3600.0, 1, 7 * 86400, doc="how often every waiting job is checked against Redis when Redis kept its data")
    shutdown_grace_s: float = _setting(30.0, 0, 3600, doc="how long stopping workers may finish running jobs")
    autoscale_jobs_per_worker: int = _setting(20, 1, 100000, doc="autoscaling: queued jobs per worker it aims for")
    autoscale_max_wait_s: float = _setting(1.0, 0, 3600, doc="autoscaling: one more worker while the oldest queued job has waited longer")
    autoscale_idle_s: float = _setting(10.0, 0.5, 86400, doc="autoscaling: empty queue this long before a worker retires (then one per half of it)")
    autoscale_max_step: int = _setting(2, 1, 256, doc="autoscaling: most workers started per second")
    health_timeout_s: float = _setting(0.8, 0.05, 10, doc="deadline of one dependency check")
    log_format: str = _setting("text", doc="`text` (one readable line) or `json` (one object per line)")
    log_level: str = _setting("INFO", doc="logging level name")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Build settings from `SLESS_*` variables, then apply keyword overrides."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None:
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check ranges and cross-field rules; raise ConfigError with a sentence."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            low, high = f.metadata["low"], f.metadata["high"]
            if low is not None and not low <= value <= high:
                raise ConfigError(f"{env_name(f.name)}={value} is out of range: it must be between {low} and {high}.")
        for name in ("timeout_s", "cpu_s", "memory_mb", "processes", "open_files", "file_mb", "tmpfs_mb",
                     "output_bytes", "result_bytes", "retries"):
            if getattr(self, f"default_{name}") > getattr(self, f"max_{name}"):
                raise ConfigError(f"{env_name('default_' + name)} must not exceed {env_name('max_' + name)}.")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"SLESS_LOG_FORMAT={self.log_format!r} is not one of: text, json.")
        if self.max_output_flood_bytes < self.max_output_bytes:
            raise ConfigError("SLESS_MAX_OUTPUT_FLOOD_BYTES must be at least SLESS_MAX_OUTPUT_BYTES.")
        if self.claim_hold_s > self.lease_s / 5:  # the sweep sends again a message taken a lease ago, unclaimed
            raise ConfigError("SLESS_CLAIM_HOLD_S must be at most a fifth of SLESS_LEASE_S.")
        if not self.queue_name:
            raise ConfigError("SLESS_QUEUE_NAME must not be empty.")

    def to_env(self) -> dict[str, str]:
        """The settings as `SLESS_*` variables, to hand to child processes."""
        return {env_name(f.name): str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> Settings:
        """A copy with some fields changed, validated again."""
        settings = dataclasses.replace(self, **changes)
        settings.validate()
        return settings


def env_name(field_name: str) -> str:
    """The environment variable that sets a field, e.g. `SLESS_REDIS_URL`."""
    return "SLESS_" + field_name.upper()


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, description) of every setting, for docs and `--help`."""
    return [(env_name(f.name), str(f.default), f.metadata["doc"]) for f in dataclasses.fields(Settings)]


def _convert(f: dataclasses.Field, raw: str):
    kind = {"int": int, "float": float, "str": str}[f.type]
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{env_name(f.name)}={raw!r} is not a valid {f.type}.") from None
