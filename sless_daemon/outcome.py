"""What an attempt produced, as the worker records it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .states import ErrorType


@dataclass(frozen=True)
class AttemptOutcome:
    """A result or an error, plus captured output and time taken."""

    result: Any = None
    error: dict | None = None  # {"type": ErrorType value, "message": str}
    stdout: str = ""
    stderr: str = ""
    duration_ms: float = 0.0
    timings: dict = field(default_factory=dict)  # epoch seconds of the attempt's stages (executor.run)

    @property
    def ok(self) -> bool:
        return self.error is None


def failed(kind: ErrorType, message: str) -> dict:
    """An error document as stored and shown: {"type", "message"}."""
    return {"type": kind.value, "message": message}
