"""How many workers a pool should run now: `sless worker --autoscale MIN:MAX`.

The pool asks `Autoscaler.decide` once per tick with what Redis says about the queue;
the policy is pure (no I/O), so its rules are tested directly.

The policy, and why:
- **Grow** when jobs wait: to one worker per `jobs_per_worker` queued messages, and by
  at least one whenever the oldest queued message has waited longer than
  `max_wait_s` (a short queue that is not moving is as bad as a long one). At most
  `max_step` workers start per tick: each costs an interpreter and a sandbox start,
  and on a small machine starting many at once slows the ones already draining.
- **Shrink** one worker at a time, only after the queue has been empty for `idle_s`,
  then at most every `idle_s / 2`, and only while the workers left would be at most
  SHRINK_UTILISATION busy (counted from the messages they are handling now): a load the pool
  just keeps up with leaves the queue empty most of the time, and shrinking then
  would only make it grow again. Bursts often come in waves, and a worker costs
  nothing while idle but a start when it is needed again. A retiring worker is
  stopped warm (SIGTERM: it finishes its job and records it), so nothing is cut short.
- Never below MIN, never above MAX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


SHRINK_UTILISATION = 0.75


@dataclass(frozen=True)
class Policy:
    minimum: int
    maximum: int
    jobs_per_worker: int = 20
    max_wait_s: float = 1.0
    idle_s: float = 10.0
    max_step: int = 2


@dataclass(frozen=True)
class QueueView:
    """What the pool knows this tick."""

    depth: int  # messages waiting in the queue
    oldest_wait_s: float  # how long the oldest of them has waited (0 when none)
    now: float  # monotonic seconds
    busy: int = 0  # this pool's workers running an attempt now


def parse_range(text: str) -> tuple[int, int]:
    """`"1:6"` -> (1, 6); ValueError with a sentence otherwise."""
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"--autoscale takes MIN:MAX, two whole numbers like 1:6; got {text!r}.")
    minimum, maximum = int(low), int(high)
    if not 1 <= minimum <= maximum <= 256:
        raise ValueError(f"--autoscale needs 1 <= MIN <= MAX <= 256; got {minimum}:{maximum}.")
    return minimum, maximum


class Autoscaler:
    """Remembers when the queue was last busy and when it last shrank; decides the target."""

    def __init__(self, policy: Policy, now: float):
        self.policy = policy
        self.busy_at = now
        self.shrunk_at = now

    def decide(self, running: int, view: QueueView) -> int:
        """The number of workers the pool should have (it starts or retires the difference)."""
        policy = self.policy
        if view.depth > 0:
            self.busy_at = view.now
            wanted = math.ceil(view.depth / policy.jobs_per_worker)
            if view.oldest_wait_s > policy.max_wait_s:
                wanted = max(wanted, running + 1)
            target = min(max(running, wanted), running + policy.max_step)
        elif (view.now - self.busy_at >= policy.idle_s and view.now - self.shrunk_at >= policy.idle_s / 2
              and view.busy <= (running - 1) * SHRINK_UTILISATION):
            target = running - 1
        else:
            target = running
        target = max(policy.minimum, min(policy.maximum, target))
        if target < running:
            self.shrunk_at = view.now
        return target
