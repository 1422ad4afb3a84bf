"""Supervises N worker processes: replaces the dead, recovers their jobs, stops them gently.

Each worker runs in its own session, so a Ctrl-C in the terminal reaches only the
pool, which then sends every worker exactly one SIGTERM (RQ's warm shutdown: finish
the running job). A second signal would make RQ stop cold, cutting the job short.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .autoscale import Autoscaler, Policy, QueueView
from .jobhost import die_with_parent
from .errors import DependencyDown
from .lifecycle import Lifecycle
from .queue import JobQueue, connect_redis
from .recovery import Recovery
from .settings import Settings
from .store import OutcomeStore, connect_mongo
from .worker import SANDBOX_UNAVAILABLE_EXIT

log = logging.getLogger("sless.pool")

# Not `-m sless_daemon.worker`: that would run the module as __main__, beside a second
# copy as `sless_daemon.worker` once anything imports it by name.
WORKER_ENTRY = "from sless_daemon.worker import main; main()"
POLL_S = 0.2
FAST_CRASH_S = 2.0  # a worker that dies sooner than this after start is crash-looping
MAX_RESPAWN_DELAY_S = 10.0
AUTOSCALE_TICK_S = 1.0


@dataclass
class WorkerSlot:
    """One place in the pool, and the process currently filling it."""

    index: int
    process: subprocess.Popen | None = None
    name: str = ""
    started_at: float = 0.0
    generation: int = 0
    respawn_at: float = 0.0
    crash_streak: int = field(default=0)
    retiring: bool = False  # autoscaling stopped it warm: once it exits, the slot goes


def worker_name(pool_id: str, index: int, generation: int) -> str:
    """Unique across hosts and restarts: host, pool pid, slot and generation."""
    return f"{pool_id}.w{index}.{generation}"


class WorkerPool:
    """Keeps `count` worker processes alive until stopped; with an autoscaler, between its
    MIN and MAX as the queue asks (autoscale.py)."""

    def __init__(self, lifecycle: Lifecycle, count: int, env: dict[str, str], sweep_interval_s: float,
                 grace_s: float, insecure: bool = False, autoscaler: Autoscaler | None = None):
        self.lifecycle = lifecycle
        self.autoscaler = autoscaler
        self.slots = [WorkerSlot(i) for i in range(autoscaler.policy.minimum if autoscaler else count)]
        self.env = env
        self.sweep_interval_s = sweep_interval_s
        self.grace_s = grace_s
        self.pool_id = f"{socket.gethostname()}.{os.getpid()}"
        self.stop_requested = threading.Event()
        self.recovery = Recovery(lifecycle, full_scan_at_start=False)  # see Recovery.sweep
        self.insecure = insecure
        self.exit_code = 0
        self.generations = 0

    def run(self) -> int:
        """Start the workers and supervise them until SIGINT or SIGTERM; returns an exit code."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stop_requested.set())
        log.info("worker pool %s starting %d workers", self.pool_id, len(self.slots))
        for slot in self.slots:
            self.spawn(slot)
        next_sweep = next_scale = 0.0
        while not self.stop_requested.wait(POLL_S):
            self.replace_dead()
            if self.autoscaler and time.monotonic() >= next_scale:
                self.scale()
                next_scale = time.monotonic() + AUTOSCALE_TICK_S
            if time.monotonic() >= next_sweep:
                try:
                    self.recovery.sweep()
                except Exception:  # noqa: BLE001 - supervising the workers matters more than one sweep
                    log.exception("recovery sweep failed; trying again")
                next_sweep = time.monotonic() + self.sweep_interval_s
        self.shutdown()
        return self.exit_code

    def spawn(self, slot: WorkerSlot) -> None:
        self.generations += 1  # pool-wide: a slot index reused by autoscaling never reuses a name
        slot.generation = self.generations
        slot.name = worker_name(self.pool_id, slot.index, slot.generation)
        command = [sys.executable, "-c", WORKER_ENTRY, "--name", slot.name, "--slot", str(slot.index)]
        if self.insecure:
            command.append("--insecure-no-sandbox")
        slot.process = subprocess.Popen(command, env=self.env, start_new_session=True, preexec_fn=_stop_with_parent)
        slot.started_at = time.monotonic()
        log.info("worker %s started (pid %d)", slot.name, slot.process.pid, extra={"worker": slot.name})

    def scale(self) -> None:
        """Start or retire workers toward the autoscaler's target for this tick."""
        active = [slot for slot in self.slots if not slot.retiring]
        try:
            depth = self.lifecycle.queue.depth()
            busy = 0 if depth else len(self.lifecycle.queue.busy_workers() & {slot.name for slot in active})
            view = QueueView(depth, self.lifecycle.queue.oldest_wait_s(), time.monotonic(), busy)
        except DependencyDown as e:
            log.warning("autoscaling paused: %s", e)
            return
        target = self.autoscaler.decide(len(active), view)
        if target != len(active):
            log.info("autoscaling from %d to %d workers (queue depth %d, oldest waited %.1f s)", len(active), target,
                     view.depth, view.oldest_wait_s)
        room = self.autoscaler.policy.maximum - len(self.slots)  # retiring workers count until they exit
        for _ in range(min(target - len(active), room)):
            used = {slot.index for slot in self.slots}
            slot = WorkerSlot(next(i for i in range(len(self.slots) + 1) if i not in used))
            self.slots.append(slot)
            self.spawn(slot)
        for slot in sorted(active, key=lambda s: s.index, reverse=True)[:max(0, len(active) - target)]:
            self.retire(slot)

    def retire(self, slot: WorkerSlot) -> None:
        """Stop a worker warm (it finishes and records its job); its slot goes when it has exited."""
        slot.retiring = True
        if slot.process is not None and slot.process.poll() is None:
            slot.process.send_signal(signal.SIGTERM)
            log.info("worker %s retiring", slot.name, extra={"worker": slot.name})

    def replace_dead(self) -> None:
        """Recover the jobs of workers that died, then start replacements (with backoff)."""
        now = time.monotonic()
        for slot in list(self.slots):
            if slot.process is not None and slot.process.poll() == SANDBOX_UNAVAILABLE_EXIT:
                log.critical("worker %s could not create its sandbox (see above); stopping the pool", slot.name)
                self.exit_code = SANDBOX_UNAVAILABLE_EXIT
                self.stop_requested.set()
                return
            if slot.retiring and (slot.process is None or slot.process.poll() is not None):
                if slot.process is not None:
                    self.bury(slot, f"worker {slot.name} was retired during the attempt")
                log.info("worker %s retired", slot.name, extra={"worker": slot.name})
                self.slots.remove(slot)
                continue
            if slot.process is not None and slot.process.poll() is not None:
                self.bury(slot, f"worker {slot.name} exited with code {slot.process.returncode} during the attempt")
                slot.crash_streak = slot.crash_streak + 1 if now - slot.started_at < FAST_CRASH_S else 0
                slot.respawn_at = now + min(MAX_RESPAWN_DELAY_S, 0.5 * (2 ** slot.crash_streak - 1))
                log.warning("worker %s exited with code %s; replacing it", slot.name, slot.process.returncode,
                            extra={"worker": slot.name})
                slot.process = None
            if slot.process is None and now >= slot.respawn_at:
                self.spawn(slot)

    def bury(self, slot: WorkerSlot, why: str) -> None:
        """Kill what the dead worker left (its RQ scheduler, say) and recover its jobs."""
        _kill_group(slot.process.pid)
        try:
            self.lifecycle.queue.forget_worker(slot.name)
        except DependencyDown as e:
            log.warning("cannot unregister worker %s: %s", slot.name, e)
        try:
            for lease in self.lifecycle.store.leases_of(slot.name):
                lost = self.lifecycle.lose(lease, why)
                if lost is None:
                    continue
                job, decision = lost
                log.warning("job %s lost with worker %s; %s", job["_id"], slot.name,
                            "retry scheduled" if decision.retry else "failed: no retries left",
                            extra={"job_id": job["_id"], "worker": slot.name})
        except DependencyDown as e:
            log.error("cannot recover the jobs of worker %s yet: %s (the recovery sweep will)", slot.name, e)

    def shutdown(self) -> None:
        """Warm-stop every worker, wait up to the grace period, then kill and recover the rest."""
        live = [s for s in self.slots if s.process is not None and s.process.poll() is None]
        log.info("stopping %d workers (grace %.0f s)", len(live), self.grace_s)
        for slot in live:
            if not slot.retiring:  # one SIGTERM only: a second would stop it cold
                slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for slot in live:
            try:
                slot.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop within the grace period; killing it", slot.name)
                _kill_group(slot.process.pid)
                slot.process.wait()
            self.bury(slot, f"worker {slot.name} was stopped during the attempt")
        log.info("worker pool stopped")


def _stop_with_parent() -> None:
    """In the child before exec: a warm SIGTERM when the pool dies, so no worker is orphaned."""
    die_with_parent(signal.SIGTERM)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def build_pool(settings: Settings, count: int, insecure: bool = False,
               autoscale: tuple[int, int] | None = None) -> WorkerPool:
    """Wire a pool whose workers inherit these settings through `SLESS_*` variables;
    `autoscale` (MIN, MAX) makes its size follow the queue."""
    store = OutcomeStore(connect_mongo(settings.mongo_url), settings.mongo_db)
    owner = f"pool.{socket.gethostname()}.{os.getpid()}"
    lifecycle = Lifecycle(settings, store, JobQueue(connect_redis(settings.redis_url), settings.queue_name), owner)
    env = {**os.environ, **settings.to_env()}
    autoscaler = None
    if autoscale:
        policy = Policy(autoscale[0], autoscale[1], settings.autoscale_jobs_per_worker, settings.autoscale_max_wait_s,
                        settings.autoscale_idle_s, settings.autoscale_max_step)
        autoscaler = Autoscaler(policy, time.monotonic())
    return WorkerPool(lifecycle, count, env, settings.sweep_interval_s, settings.shutdown_grace_s, insecure, autoscaler)
