"""Logging set-up: one readable line per event, or one JSON object per line on request."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

# Fields callers may pass with `extra=` that the JSON format lifts to top level.
CONTEXT_FIELDS = ("job_id", "attempt", "worker", "duration_ms", "error_type", "state")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the job context."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in CONTEXT_FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: str = "text", level: str = "INFO", name: str = "") -> None:
    """Send logs to stderr in the chosen format; `name` prefixes text lines (a worker's)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"{name} " if name else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("rq", "pymongo", "granian", "_granian"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def summarize(value, limit: int = 80) -> str:
    """A short JSON rendering of a value for a log line."""
    try:
        text = json.dumps(value, default=repr)
    except (ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
