"""The test suite's time against its target (issue 26: about 6 minutes on 2 cores).

Runs README's test command (`python -m pytest -q`, plus any arguments given here) from the repository root and
prints its wall time, the ratio to the 360 s target, and how busy the whole machine was meanwhile (from
/proc/stat: every process counts, Ray's daemons, the Label Studio server and Chromium included, which the
test processes' own CPU times miss). On 2 cores the suite is CPU-bound: machine CPU-seconds / cores is about
the wall time, so that is the figure to cut. Run it on a quiet machine; another job's load counts here too.

    python benchmarks/suite.py [PYTEST ARGS...]        (Linux: reads /proc/stat)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 360.0


def busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot: busy = user + nice + system + irq + softirq + steal."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def main(argv: list[str]) -> int:
    tick = os.sysconf("SC_CLK_TCK")
    cores = os.cpu_count() or 1
    b0, t0 = busy_ticks()
    w0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", *argv], cwd=ROOT)
    wall = time.monotonic() - w0
    b1, t1 = busy_ticks()
    cpu = (b1 - b0) / tick
    print(f"\nsuite: exit {done.returncode}, {wall:.1f} s wall on {cores} cores; target {TARGET_S:.0f} s")
    print(f"ratio wall / target: {wall / TARGET_S:.2f}")
    print(f"machine busy: {cpu:.0f} CPU-s ({100 * (b1 - b0) / max(1, t1 - t0):.0f}% of all cores while it ran)")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
