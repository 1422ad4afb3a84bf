"""The limits of one attempt: what a job may ask for, and what it gets by default.

Each limit has a default and a configured maximum in Settings (`default_<name>`,
`max_<name>`); a job may ask for any value from the floor below up to the maximum.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .settings import Settings

# name -> (whole number?, floor, what it limits); units are in the names
LIMIT_RULES = {
    "timeout_s": (False, 0.1, "wall-clock seconds of one attempt"),
    "cpu_s": (False, 0.1, "CPU seconds of one attempt (absent: timeout_s + 1)"),
    "memory_mb": (True, 16, "memory of the whole attempt"),
    "processes": (True, 4, "processes and threads at once"),
    "open_files": (True, 16, "open files per process"),
    "file_mb": (True, 1, "largest file written"),
    "tmpfs_mb": (True, 1, "size of the writable /work"),
    "output_bytes": (True, 1024, "kept bytes of stdout and of stderr"),
    "result_bytes": (True, 1024, "largest JSON result"),
}


@dataclass(frozen=True)
class Limits:
    """Resolved limits of one attempt."""

    timeout_s: float
    cpu_s: float
    memory_mb: int
    processes: int
    open_files: int
    file_mb: int
    tmpfs_mb: int
    output_bytes: int
    result_bytes: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_limits(settings: Settings) -> Limits:
    return resolve({}, settings)


def maximum(settings: Settings, name: str):
    return getattr(settings, f"max_{name}")


def resolve(requested: dict, settings: Settings) -> Limits:
    """Fill what a (validated) request left out with the defaults; CPU follows the wall clock."""
    values = {name: requested.get(name) if requested.get(name) is not None else getattr(settings, f"default_{name}")
              for name in LIMIT_RULES}
    if not values["cpu_s"]:
        values["cpu_s"] = float(math.ceil(values["timeout_s"]) + 1)
    return Limits(**values)


def from_document(stored: dict) -> Limits:
    """The limits as stored with a job."""
    return Limits(**{name: stored[name] for name in LIMIT_RULES})
