"""Benchmark (not a test): a burst on an autoscaled pool, next to a fixed pool of MAX.

    python3 bench/autoscale.py [--jobs 2000] [--min 1] [--max 6]

For each pool (`sless worker --autoscale MIN:MAX` at the default policy, then
`--count MAX`), starting idle: submit the burst of `double` jobs from 8 clients,
sample the number of live workers every 0.1 s, and report the time to reach MAX,
the drain time (first submit to last job recorded), the time back to MIN after the
last job, the peak, and jobs lost (not completed). Prints a Markdown table and writes
bench/results/autoscale.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import compare  # noqa: E402
import tasks  # noqa: E402
from tests.stack import wait_until  # noqa: E402

SAMPLE_S = 0.1
BACK_TO_MIN_TIMEOUT_S = 180


class Sampler(threading.Thread):
    """The pool's size as Redis sees it (registered workers), with the time of each sample."""

    def __init__(self, stack):
        super().__init__(daemon=True)
        self.stack = stack
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append((time.monotonic(), len(self.stack.live_workers())))
            time.sleep(SAMPLE_S)

    def first_time_at(self, size: int, after: float) -> float | None:
        return next((t for t, n in self.samples if t >= after and n == size), None)


def run_pool(log_dir: Path, jobs: int, minimum: int, maximum: int, autoscale: bool) -> dict:
    with compare.running_stack(log_dir, workers=0) as stack:
        if autoscale:
            stack.pool_args = ("--autoscale", f"{minimum}:{maximum}")
        stack.workers = minimum if autoscale else maximum
        stack.start_pool()
        sampler = Sampler(stack)
        sampler.start()
        started = time.monotonic()
        submitted = compare.submitted_or_fail(compare.run_clients(stack.url, tasks.SLESS_CODE["double"], jobs))
        compare.wait_for_count(lambda: compare.sless_terminal(stack), jobs, 0.2,
                               lambda: stack.pool.poll() is None, "autoscale")
        drained = time.monotonic()
        if autoscale:
            wait_until(lambda: sampler.samples[-1][1] == minimum, BACK_TO_MIN_TIMEOUT_S, "the pool did not shrink")
        sampler.stopping.set()
        sampler.join()
        outcome = compare.sless_outcome(stack, submitted["inputs"], drained - started)
        reached_max = sampler.first_time_at(maximum, started)
        back = sampler.first_time_at(minimum, drained) if autoscale else None
        return {"pool": f"autoscale {minimum}:{maximum}" if autoscale else f"fixed {maximum}", "jobs": jobs,
                "to_max_s": round(reached_max - started, 2) if reached_max else None,
                "drain_s": round(drained - started, 2), "back_to_min_s": round(back - drained, 2) if back else None,
                "peak_workers": max(n for _, n in sampler.samples), "not_completed": outcome["failed"],
                "wrong_results": outcome["wrong_results"], "retried": outcome["retried"],
                "sizes": [(round(t - started, 1), n) for t, n in sampler.samples][::5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--min", type=int, default=1)
    parser.add_argument("--max", type=int, default=6)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="sless-autoscale-"))
    rows = [run_pool(log_dir, args.jobs, args.min, args.max, autoscale=True),
            run_pool(log_dir, args.jobs, args.min, args.max, autoscale=False)]
    print("| pool | jobs | time to MAX s | drain s | back to MIN s | peak workers | not completed | wrong results | "
          "retried |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['pool']} | {row['jobs']} | {row['to_max_s']} | {row['drain_s']} | {row['back_to_min_s']} | "
              f"{row['peak_workers']} | {row['not_completed']} | {row['wrong_results']} | {row['retried']} |")
    out = ROOT / "bench" / "results" / "autoscale.json"
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, indent=1))
    print(f"raw numbers: {out.relative_to(ROOT)}; logs: {log_dir}")


if __name__ == "__main__":
    main()
