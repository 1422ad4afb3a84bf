"""The HTTP API: routes that validate requests, accept jobs and report their status.

Built from its parts by `make_app`; no user code ever runs here. Every answer is
JSON, errors included: {"error": "<one sentence>"} with a fitting status code.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import bottle
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .errors import BadRequest, DependencyDown
from .feed import START, check_cursor
from .health import HealthChecker
from .intake import GroupCommit
from .lifecycle import Lifecycle
from .metrics import DaemonMetrics
from .settings import Settings
from .spec import EXECUTE_FIELDS, number_field, parse_body, parse_job
from .states import JobState
from .status import status_document, summary_document
from .store import derive

log = logging.getLogger("sless.daemon")

JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
MAX_WAIT_S = 3600.0
PUBLIC_ROUTES = {("GET", "/"), ("GET", "/openapi.json")}  # what a client needs before it has a token


def json_response(status: int, payload: dict) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(
        body=json.dumps(payload), status=status, headers={"Content-Type": "application/json"},
    )


def error_response(status: int, message: str) -> bottle.HTTPResponse:
    return json_response(status, {"error": message})


def read_body(request: bottle.LocalRequest, max_bytes: int) -> bytes:
    """The raw body, refusing more than `max_bytes` before reading it all."""
    if request.content_length > max_bytes:
        raise BadRequest(f"The request body is {request.content_length} bytes; the limit is {max_bytes}.", 413)
    body = request.environ["wsgi.input"].read(max_bytes + 1) if request.content_length != 0 else b""
    if len(body) > max_bytes:
        raise BadRequest(f"The request body is larger than the limit of {max_bytes} bytes.", 413)
    return body


def check_token(request: bottle.LocalRequest, token: str) -> None:
    """Require `Authorization: Bearer <token>` when a token is configured."""
    if not token or (request.method, request.path) in PUBLIC_ROUTES:
        return
    given = request.get_header("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise BadRequest("This endpoint needs the header 'Authorization: Bearer <token>' with the API token.", 401)


class Api:
    """The routes, with the collaborators they need passed in."""

    def __init__(self, settings: Settings, lifecycle: Lifecycle, health: HealthChecker):
        self.settings = settings
        self.lifecycle = lifecycle
        self.intake = GroupCommit(lifecycle.accept_many)
        self.store = lifecycle.store
        self.feed = lifecycle.feed
        self.health = health
        self.counters = DaemonMetrics(lifecycle.queue)
        # long polls may hold at most half the request threads; the rest stay for everything else
        self.long_polls = threading.BoundedSemaphore(max(1, settings.daemon_threads // 2))

    def index(self):
        return {"service": "sless", "status": "ok", "version": __version__}

    def redis(self):
        status = self.health.redis()
        return json_response(200 if status["status"] == "ok" else 503, {"dependency": "redis", **status})

    def mongo(self):
        status = self.health.mongo()
        return json_response(200 if status["status"] == "ok" else 503, {"dependency": "mongodb", **status})

    def health_all(self):
        """Everything `sless health` shows, in one call."""
        started = time.perf_counter()
        checks = self.health.everything()
        daemon = {"status": "ok", "version": __version__, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
        healthy = all(c["status"] == "ok" for c in checks.values())
        return json_response(200 if healthy else 503, {"status": "ok" if healthy else "degraded", "daemon": daemon,
                                                       **checks})

    def submit(self):
        started = time.perf_counter()
        spec = parse_job(parse_body(read_body(bottle.request, self.settings.max_body_bytes)), self.settings)
        stages = {"parse": time.perf_counter() - started}
        job_id = self.intake.accept(spec, stages)["_id"]
        self.counters.submitted.inc()
        response = json_response(202, {"jobId": job_id, "status": JobState.SUBMITTED.value})
        response.set_header("Server-Timing", ", ".join(f"{name};dur={s * 1000:.3f}" for name, s in stages.items()))
        return response

    def execute(self):
        data = parse_body(read_body(bottle.request, self.settings.max_body_bytes))
        spec = parse_job({k: v for k, v in data.items() if k != "wait_s"}, self.settings, EXECUTE_FIELDS)
        wait_s = number_field(data, "wait_s", spec.timeout_s + self.settings.execute_margin_s, 0, MAX_WAIT_S)
        submitted = self.intake.accept(spec, {})
        self.counters.submitted.inc()
        job_id = submitted["_id"]
        job = self.wait_for_end(submitted, wait_s)
        if job is None:
            return json_response(503, {"jobId": job_id, "error": "The job was accepted, but MongoDB stopped answering "
                                       "while waiting for it; poll GET /status/<jobId>."})
        return json_response(200 if JobState(job["state"]).is_terminal else 202, status_document(job))

    def wait_for_end(self, submitted: dict, wait_s: float) -> dict | None:
        """Wait for the job's attempts to be announced (queue.announce_settled) until it is
        terminal or `wait_s` passes; return the job as last seen. Without Redis, it polls.

        A first attempt's settle event completes the document just submitted, so the
        answer needs no read of MongoDB (the event was written there before it was
        announced); a job with earlier attempts is read back for their errors.
        """
        job_id = submitted["_id"]
        deadline = time.monotonic() + wait_s
        job = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = self.lifecycle.queue.wait_settled(job_id, min(max(remaining, 0.0), WAKE_CHECK_S))
            except DependencyDown:
                event = None
                time.sleep(min(max(remaining, 0.0), 0.1))
            if event and "changes" in event and event["attempt"] == 1 and JobState(event["state"]).is_terminal:
                return derive(submitted, [event], [])  # a whole event (a large one is announced without outcome)
            try:
                job = self.store.get(job_id)
            except DependencyDown:
                pass
            if (job and JobState(job["state"]).is_terminal) or deadline - time.monotonic() <= 0:
                return job

    def retry(self, job_id: str):
        """Dead letters: a failed job runs again as a new attempt."""
        if not JOB_ID_PATTERN.match(job_id):
            raise BadRequest(f"No job has the id {job_id[:64]!r}.", 404)
        return json_response(202, status_document(self.lifecycle.reopen(job_id)))

    def status(self, job_id: str):
        return status_document(self.job(job_id))

    def job(self, job_id: str) -> dict:
        """The job as of now; BadRequest 404 for an id no job has."""
        job = self.store.get(job_id) if JOB_ID_PATTERN.match(job_id) else None
        if job is None:
            raise BadRequest(f"No job has the id {job_id[:64]!r}.", 404)
        return job

    def cancel(self, job_id: str):
        if not JOB_ID_PATTERN.match(job_id):
            raise BadRequest(f"No job has the id {job_id[:64]!r}.", 404)
        job, cancelled = self.lifecycle.cancel(job_id)
        return json_response(200 if cancelled else 202, status_document(job))

    def jobs(self):
        """Recent jobs, newest first: `state`, `limit` (default 20) and `since` narrow them."""
        query = bottle.request.query
        state = query.get("state") or None
        if state is not None and state not in STATES:
            raise BadRequest(f"The parameter 'state' must be one of {', '.join(STATES)}; got {state[:64]!r}.")
        limit = int(query_number(query, "limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT, whole=True))
        since = query_time(query, "since")
        listed = [summary_document(job) for job in self.store.recent(limit, since, state)]
        return {"jobs": listed, "count": len(listed)}

    def events(self, job_id: str):
        """Long poll: the job's feed entries after `after`, waiting up to `wait_s` for one."""
        query = bottle.request.query
        after = query.get("after") or START
        wait_s = query_number(query, "wait_s", DEFAULT_EVENTS_WAIT_S, 0, MAX_EVENTS_WAIT_S)
        check_cursor(after)
        if not (JOB_ID_PATTERN.match(job_id) and (self.feed.exists(job_id) or self.store.exists(job_id))):
            raise BadRequest(f"No job has the id {job_id[:64]!r}.", 404)
        may_wait = self.long_polls.acquire(blocking=False)  # else half the threads wait: answer now
        try:
            found, cursor = self.feed.read(job_id, after, wait_s if may_wait else 0.0)
        finally:
            if may_wait:
                self.long_polls.release()
        return {"jobId": job_id, "cursor": cursor, "events": found}

    def logs(self, job_id: str):
        """The output of the job's latest attempt: from its feed while it runs, else from the record."""
        job = self.job(job_id)
        found, cursor = self.feed.history(job_id)
        output = {"stdout": job.get("stdout", ""), "stderr": job.get("stderr", "")}
        if job["state"] == JobState.RUNNING.value:
            for stream in output:
                output[stream] = "".join(e["text"] for e in found if e["kind"] == "output"
                                         and e["attempt"] == job["attempts"] and e["stream"] == stream)
        return {"jobId": job_id, "state": job["state"], "attempt": job["attempts"], **output, "cursor": cursor}

    def metrics(self):
        bottle.response.content_type = CONTENT_TYPE_LATEST
        return generate_latest(self.counters.registry)

    def openapi(self):
        bottle.response.content_type = "application/json"
        return openapi_document()


WAKE_CHECK_S = 1.0  # read the record at least this often while waiting, in case an announcement is lost
STATES = [state.value for state in JobState]
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 20, 1000
DEFAULT_EVENTS_WAIT_S, MAX_EVENTS_WAIT_S = 25.0, 60.0


def query_number(query, name: str, default: float, low: float, high: float, whole: bool = False) -> float:
    """A number from the query string in [low, high], or the default when absent."""
    text = query.get(name)
    if text in (None, ""):
        return default
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise BadRequest(f"The parameter {name!r} must be {kind}; got {text[:64]!r}.") from None
    if not low <= value <= high:  # NaN fails it too; a huge whole number is compared, not converted
        raise BadRequest(f"The parameter {name!r} must be between {low:g} and {high:g}; got {text[:64]!r}.")
    return value


def query_time(query, name: str) -> datetime | None:
    """An ISO 8601 time from the query string (UTC when it names no zone), or None."""
    text = query.get(name)
    if text in (None, ""):
        return None
    try:
        moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        # in UTC here: one whose offset takes it outside years 1-9999 fails now, not in BSON
        return moment.astimezone(timezone.utc) if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError):
        raise BadRequest(f"The parameter {name!r} must be an ISO 8601 time like 2026-11-28T17:00:00Z; "
                         f"got {text[:64]!r}.") from None


@functools.lru_cache(maxsize=1)
def openapi_document() -> str:
    """The API's OpenAPI 3 description, shipped beside this module (tests check it against the routes)."""
    return (Path(__file__).parent / "openapi.json").read_text()


def make_app(settings: Settings, lifecycle: Lifecycle, health: HealthChecker) -> bottle.Bottle:
    """Build the WSGI application from its collaborators."""
    api = Api(settings, lifecycle, health)
    app = bottle.Bottle(autojson=True)
    app.route("/", "GET", api.index)
    app.route("/redis", "GET", api.redis)
    app.route("/mongo", "GET", api.mongo)
    app.route("/health", "GET", api.health_all)
    app.route("/submit", "POST", api.submit)
    app.route("/execute", "POST", api.execute)
    app.route("/status/<job_id>", "GET", api.status)
    app.route("/retry/<job_id>", "POST", api.retry)
    app.route("/cancel/<job_id>", "POST", api.cancel)
    app.route("/jobs", "GET", api.jobs)
    app.route("/events/<job_id>", "GET", api.events)
    app.route("/logs/<job_id>", "GET", api.logs)
    app.route("/metrics", "GET", api.metrics)
    app.route("/openapi.json", "GET", api.openapi)
    app.install(error_plugin(settings, api.counters))
    for code, message in ((404, "No such endpoint."), (405, "This endpoint does not allow that method.")):
        app.error(code)(_json_error(code, message))
    app.error(500)(_json_error(500, "Internal error; the daemon's log has the details."))
    return app


def unavailable_message(dependency: str, path: str) -> str:
    """What a 503 tells the caller: a new job is not accepted (nothing of it is kept); a
    retry or cancel may have been written before the dependency failed, so it says so."""
    if path in ("/submit", "/execute"):
        return f"{dependency} is unavailable, so the job was not accepted; try again shortly."
    if path.startswith(("/retry/", "/cancel/")):
        return (f"{dependency} is unavailable, so the request may not have taken effect; "
                "check the job's status and try again shortly.")
    return f"{dependency} is unavailable; try again shortly."


def _json_error(code: int, message: str):
    def handler(error: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        return json.dumps({"error": message})

    return handler


def error_plugin(settings: Settings, counters: DaemonMetrics):
    """Turn sless errors into JSON answers; check the token before any route runs."""

    def plugin(callback):
        def wrapper(*args, **kwargs):
            try:
                check_token(bottle.request, settings.api_token)
                return callback(*args, **kwargs)
            except BadRequest as e:
                counters.rejected.labels(str(e.status)).inc()
                return error_response(e.status, str(e))
            except DependencyDown as e:
                log.warning("%s %s: %s", bottle.request.method, bottle.request.path, e)
                counters.rejected.labels("503").inc()
                return error_response(503, unavailable_message(e.dependency, bottle.request.path))

        return wrapper

    return plugin
