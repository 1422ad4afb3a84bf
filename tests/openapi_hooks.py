"""Schemathesis hooks for the live run of test_openapi.py, loaded with SCHEMATHESIS_HOOKS.

The document lets POST /execute wait up to 3600 s and GET /events long-poll up to 60 s,
both legitimately; generated waits are cut so the run stays short. Only values within
the allowed range are cut, to another allowed value, so a case meant to be refused
(a negative one) is still refused.
"""

from __future__ import annotations

import schemathesis

EXECUTE_WAIT_CAP_S = 1.0  # an /execute cut short answers 202 with the status document, as documented
EVENTS_WAIT_CAP_S = 0.5  # an /events cut short answers 200 with an empty page, as documented
MAX_EXECUTE_WAIT_S, MAX_EVENTS_WAIT_S = 3600, 60  # the document's maxima


@schemathesis.hook
def before_call(context, case, kwargs):
    """Cut long waits just before a generated request is sent."""
    if case.path == "/execute" and isinstance(case.body, dict):
        wait = case.body.get("wait_s")
        if wait is None or (_is_number(wait) and EXECUTE_WAIT_CAP_S < wait <= MAX_EXECUTE_WAIT_S):
            case.body["wait_s"] = EXECUTE_WAIT_CAP_S
    if case.path == "/events/{job_id}" and isinstance(case.query, dict):
        wait = _as_number(case.query.get("wait_s"))
        if "wait_s" not in case.query or (wait is not None and EVENTS_WAIT_CAP_S < wait <= MAX_EVENTS_WAIT_S):
            case.query["wait_s"] = EVENTS_WAIT_CAP_S


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_number(value) -> float | None:
    """A query value as the daemon reads it (query strings are text), or None if it is no number."""
    if _is_number(value):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None
