"""Starts the HTTP daemon on waitress, a production threaded WSGI server."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import waitress

from .app import make_app
from .errors import DependencyDown
from .health import HealthChecker
from .lifecycle import Lifecycle
from .logs import configure_logging
from .queue import JobQueue, connect_redis
from .recovery import Recovery
from .settings import Settings
from .store import OutcomeStore, connect_mongo

log = logging.getLogger("sless.daemon")

INDEX_RETRY_S = 5.0
# waitress refuses bodies past this before our app sees them, with its own plain 413;
# between max_body_bytes and this, the app answers with a JSON 413.
WAITRESS_BODY_FACTOR = 4


def build_app(settings: Settings):
    """Wire the app: one client set for jobs, one with short timeouts for health checks."""
    store = OutcomeStore(connect_mongo(settings.mongo_url), settings.mongo_db)
    queue = JobQueue(connect_redis(settings.redis_url), settings.queue_name)
    health_store = OutcomeStore(connect_mongo(settings.mongo_url, settings.health_timeout_s), settings.mongo_db)
    health_queue = JobQueue(connect_redis(settings.redis_url, settings.health_timeout_s), settings.queue_name)
    health = HealthChecker(health_store, health_queue, settings.health_timeout_s)
    owner = f"daemon.{socket.gethostname()}.{os.getpid()}"
    lifecycle = Lifecycle(settings, store, queue, owner)
    return make_app(settings, lifecycle, health), lifecycle


def ensure_indexes_soon(store: OutcomeStore) -> None:
    """Create indexes now, or keep trying in the background while MongoDB is away."""

    def attempt() -> None:
        while True:
            try:
                store.ensure_indexes()
                return
            except DependencyDown as e:
                log.warning("cannot create indexes yet: %s; retrying in %.0f s", e, INDEX_RETRY_S)
                time.sleep(INDEX_RETRY_S)

    threading.Thread(target=attempt, name="ensure-indexes", daemon=True).start()


def serve(settings: Settings) -> None:
    """Serve the API until interrupted."""
    configure_logging(settings.log_format, settings.log_level, "daemon")
    app, lifecycle = build_app(settings)
    ensure_indexes_soon(lifecycle.store)
    Recovery(lifecycle).run_in_background(settings.sweep_interval_s, threading.Event())
    log.info("sless daemon listening on http://%s:%d (queue %s)", settings.host, settings.port, settings.queue_name)
    waitress.serve(
        app, host=settings.host, port=settings.port, threads=settings.daemon_threads, ident="sless",
        max_request_body_size=settings.max_body_bytes * WAITRESS_BODY_FACTOR, _quiet=True,
    )
