"""What a caller asks for: a validated job specification built from a request body."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest
from .limits import LIMIT_RULES, Limits, maximum, resolve
from .settings import Settings

JOB_FIELDS = ("code", "input", "retries", "entry", *LIMIT_RULES)
EXECUTE_FIELDS = JOB_FIELDS + ("wait_s",)


@dataclass(frozen=True)
class JobSpec:
    """One job as accepted: code, its JSON input, retries and the limits of each attempt.

    `input_json` is the input encoded once, where a request is checked (parse_job): an
    input too deeply nested to encode is refused there, as its own request's 400, not
    found later in a group of submissions written together (intake.GroupCommit), whose
    every request would then fail with it.
    """

    code: str
    input: Any
    limits: Limits
    retries: int
    entry: str | None = None
    input_json: str = ""

    def __post_init__(self):
        if not self.input_json:
            object.__setattr__(self, "input_json", json.dumps(self.input))

    @property
    def max_attempts(self) -> int:
        return self.retries + 1

    @property
    def timeout_s(self) -> float:
        return self.limits.timeout_s

    @property
    def memory_mb(self) -> int:
        return self.limits.memory_mb


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
    if "\x00" in code:
        raise BadRequest("The field 'code' contains a NUL character (\\u0000), which Python source cannot hold.")
    return JobSpec(
        code=code,
        input=data.get("input"),
        input_json=input_json(data.get("input")),
        limits=resolve(limit_fields(data, settings), settings),
        retries=int_field(data, "retries", settings.default_retries, 0, settings.max_retries),
        entry=entry_field(data),
    )


def input_json(value: Any) -> str:
    """The input as JSON text; BadRequest when it is nested too deeply to encode."""
    try:
        return json.dumps(value)
    except RecursionError:
        raise BadRequest("The field 'input' is nested too deeply (arrays or objects inside one another "
                         "hundreds of levels down); flatten it.") from None


def limit_fields(data: dict, settings: Settings) -> dict:
    """The limits a request asks for, each checked against its floor and configured maximum."""
    asked = {}
    for name, (whole, floor, _) in LIMIT_RULES.items():
        field_check = int_field if whole else number_field
        asked[name] = field_check(data, name, None, floor, maximum(settings, name))
    return asked


def number_field(data: dict, name: str, default: float | None, low: float, high: float) -> float | None:
    """A finite number in [low, high], or the default when absent or null.

    Compared as it came: a whole number too large for a float (10**400) and NaN fail the
    range check, with the number in the message, instead of raising in a conversion.
    """
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"The field {name!r} must be a number, not a JSON {_json_kind(value)}.")
    if not low <= value <= high:
        raise BadRequest(f"The field {name!r} must be between {low:g} and {high:g}; got {_number_text(value)}.")
    return float(value)


def int_field(data: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    """A whole number in [low, high], or the default when absent or null."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"The field {name!r} must be a whole number, not a JSON {_json_kind(value)}.")
    if not low <= value <= high:
        raise BadRequest(f"The field {name!r} must be between {low} and {high}; got {_number_text(value)}.")
    return value


def entry_field(data: dict) -> str | None:
    """The entry function's name: a Python identifier, or None for the default."""
    entry = data.get("entry")
    if entry is None:
        return None
    if not isinstance(entry, str) or not entry.isidentifier():
        raise BadRequest("The field 'entry' must be the name of a function, such as \"main\".")
    return entry


def _number_text(value: int | float) -> str:
    """A number for an error message: a float as %g, a whole number cut to 40 digits."""
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 40 else f"{text[:40]}... ({len(text)} digits)"


def _json_kind(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)
