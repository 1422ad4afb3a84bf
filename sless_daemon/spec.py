"""What a caller asks for: a validated job specification built from a request body."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest
from .settings import Settings

JOB_FIELDS = ("code", "input", "timeout_s", "memory_mb", "retries", "entry")
EXECUTE_FIELDS = JOB_FIELDS + ("wait_s",)


@dataclass(frozen=True)
class JobSpec:
    """One job as accepted: code, its JSON input, and its limits (units in names)."""

    code: str
    input: Any
    timeout_s: float
    memory_mb: int
    retries: int
    entry: str | None = None

    @property
    def max_attempts(self) -> int:
        return self.retries + 1


def parse_body(body: bytes) -> dict:
    """Decode a JSON object from raw bytes or raise BadRequest saying what is wrong."""
    if not body:
        raise BadRequest("The request body is empty; send a JSON object such as {\"code\": \"return input\", \"input\": 1}.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The request body is not UTF-8 text.") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"The request body is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise BadRequest(f"The request body must be a JSON object, not a JSON {_json_kind(data)}.")
    return data


def parse_job(data: dict, settings: Settings, allowed: tuple[str, ...] = JOB_FIELDS) -> JobSpec:
    """Validate a decoded submission against the settings' limits."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BadRequest(f"Unknown field {unknown[0]!r}; allowed fields are: {', '.join(allowed)}.")
    if "code" not in data:
        raise BadRequest("The field 'code' is missing; it must hold the function's source as a string.")
    code = data["code"]
    if not isinstance(code, str):
        raise BadRequest(f"The field 'code' must be a string, not a JSON {_json_kind(code)}.")
    if not code.strip():
        raise BadRequest("The field 'code' is empty.")
    return JobSpec(
        code=code,
        input=data.get("input"),
        timeout_s=number_field(data, "timeout_s", settings.default_timeout_s, 0.1, settings.max_timeout_s),
        memory_mb=int_field(data, "memory_mb", settings.default_memory_mb, 16, settings.max_memory_mb),
        retries=int_field(data, "retries", settings.default_retries, 0, settings.max_retries),
        entry=entry_field(data),
    )


def number_field(data: dict, name: str, default: float, low: float, high: float) -> float:
    """A finite number in [low, high], or the default when absent or null."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"The field {name!r} must be a number, not a JSON {_json_kind(value)}.")
    if not low <= value <= high:
        raise BadRequest(f"The field {name!r} must be between {low:g} and {high:g}; got {value:g}.")
    return float(value)


def int_field(data: dict, name: str, default: int, low: int, high: int) -> int:
    """A whole number in [low, high], or the default when absent or null."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"The field {name!r} must be a whole number, not a JSON {_json_kind(value)}.")
    if not low <= value <= high:
        raise BadRequest(f"The field {name!r} must be between {low} and {high}; got {value}.")
    return value


def entry_field(data: dict) -> str | None:
    """The entry function's name: a Python identifier, or None for the default."""
    entry = data.get("entry")
    if entry is None:
        return None
    if not isinstance(entry, str) or not entry.isidentifier():
        raise BadRequest("The field 'entry' must be the name of a function, such as \"main\".")
    return entry


def _json_kind(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)
