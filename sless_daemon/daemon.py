"""Starts the HTTP daemon on Granian, a production WSGI server: HTTP/1.1 in Rust (hyper),
the app in a pool of Python threads.

Chosen over waitress, which served it before, because its HTTP handling costs the
daemon's one Python process much less CPU per request: 0.56-0.59 ms against 0.81-1.09 ms
of daemon CPU per submit, measured with `bench/compare.py`'s 8 submit clients
(BENCHMARKS.md, session 5). Granian runs the app in a worker process it starts and
supervises; `make_wsgi_app` builds it there, with the settings this process was given.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import socket
import threading
import time

from granian.constants import HTTPModes, Interfaces
from granian.server import Server

from .app import make_app
from .errors import ConfigError, DependencyDown
from .health import HealthChecker
from .jobhost import die_with_parent
from .lifecycle import Lifecycle
from .logs import configure_logging
from .queue import JobQueue, connect_redis
from .recovery import Recovery
from .settings import Settings
from .store import OutcomeStore, connect_mongo

log = logging.getLogger("sless.daemon")

INDEX_RETRY_S = 5.0
STOP_GRACE_S = 5  # on SIGTERM, requests in flight (an /execute or /events still waiting) get this long
# Granian's own warnings (a worker that died, a forced stop) go to sless's log handler.
GRANIAN_LOGGING = {"loggers": {"_granian": {"handlers": [], "propagate": True}}}


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


def make_wsgi_app(settings: Settings, parent_pid: int):
    """In Granian's worker process: the app, its index creation and its recovery sweep.

    The worker dies with the `sless daemon` process that started it (SIGKILL included),
    so a restarted daemon never finds the port held by an orphan.
    """
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)  # the daemon died before the line above
    configure_logging(settings.log_format, settings.log_level, "daemon")
    app, lifecycle = build_app(settings)
    ensure_indexes_soon(lifecycle.store)
    Recovery(lifecycle).run_in_background(settings.sweep_interval_s, threading.Event())
    # What was made to start lives as long as the process: kept out of the collector, so a
    # full collection walks only what requests made since, not the 49,000 objects of the
    # start too (8.7 ms alone; a worker's took 13-15 ms under load, pausing every thread
    # once every few seconds: BENCHMARKS.md, step 23).
    gc.collect()  # what start-up left as garbage is not kept for ever
    gc.freeze()
    return app


def ensure_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on. Granian's listener lets any other listener
    that allows it share the port (SO_REUSEPORT), so a second daemon started by mistake
    would quietly take half the requests; a probe bound without that option fails instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections do not count
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror} "
                              "(is another daemon running there?)") from None


def serve(settings: Settings) -> None:
    """Serve the API until interrupted (SIGTERM or SIGINT: Granian stops its worker, waiting up
    to STOP_GRACE_S for the requests in flight). A worker that dies is started again."""
    ensure_port_free(settings.host, settings.port)
    server = Server(
        "sless_daemon.daemon:make_wsgi_app", address=settings.host, port=settings.port, interface=Interfaces.WSGI,
        workers=1, blocking_threads=settings.daemon_threads, http=HTTPModes.http1, websockets=False,
        log_level="warning", log_dictconfig=GRANIAN_LOGGING, respawn_failed_workers=True,
        workers_kill_timeout=STOP_GRACE_S,
    )
    configure_logging(settings.log_format, settings.log_level, "daemon")  # after Server(), which configures logging
    log.info("sless daemon listening on http://%s:%d (queue %s)", settings.host, settings.port, settings.queue_name)
    server.serve(target_loader=functools.partial(make_wsgi_app, settings, os.getpid()), wrap_loader=False)
