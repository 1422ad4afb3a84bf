"""The benchmark's job functions, once as Python functions (for plain RQ) and once as sless code.

    python bench/tasks.py      # prints how long cpu10 takes here, in this interpreter and the sandbox's

`double` is the trivial job; `cpu10` burns about 10 ms of CPU in a pure-Python loop
first. CPU_LOOPS was found once on the benchmark machine so that the loop takes about
10 ms under the project's interpreter; the sandbox runs Debian's /usr/bin/python3,
which may run it at a slightly different speed, so compare.py measures and reports both.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CPU_LOOPS = 190_000

CPU_BODY = f"""total = 0
for i in range({CPU_LOOPS}):
    total += i * i % 7
"""


def double(x):
    return x * 2


def cpu10(x):
    total = 0
    for i in range(CPU_LOOPS):
        total += i * i % 7
    return x * 2


# The same bodies as sless function bodies (the parameter is `input`).
SLESS_CODE = {
    "double": "return input * 2",
    "cpu10": CPU_BODY + "return input * 2",
}
FUNCTIONS = {"double": double, "cpu10": cpu10}


def cpu_loop_ms(python: str = sys.executable, runs: int = 20) -> float:
    """Median milliseconds of the cpu10 loop alone, run `runs` times by `python`."""
    body = "".join("    " + line + "\n" for line in CPU_BODY.splitlines())
    script = (f"import time, statistics\ndef burn():\n{body}\nsamples = []\nfor _ in range({runs}):\n"
              "    started = time.perf_counter()\n    burn()\n"
              "    samples.append((time.perf_counter() - started) * 1000)\nprint(statistics.median(samples))\n")
    out = subprocess.run([python, "-I", "-S", "-c", script], capture_output=True, text=True, check=True).stdout
    return float(out)


def cpu_loop_ms_here(runs: int = 20) -> float:
    """The same, in this process (what a plain RQ worker's job costs)."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        cpu10(0)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


if __name__ == "__main__":
    print(f"cpu10 loop ({CPU_LOOPS} iterations): {cpu_loop_ms_here():.2f} ms in {sys.executable}, "
          f"{cpu_loop_ms('/usr/bin/python3'):.2f} ms in /usr/bin/python3")
