"""Shared helpers of the benchmarks: timing, peak memory, and the result rows.

Every benchmark measures its subject *and* a reference in the same run, on the same machine,
and reports the ratio, so numbers from different machines can be compared.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchResult:
    name: str
    value: float
    unit: str
    reference: float | None = None  # same quantity measured for the reference, same run
    reference_name: str = ""
    target: str = ""  # human-readable target, e.g. "ratio >= 0.8"

    @property
    def ratio(self) -> float | None:
        if self.reference in (None, 0):
            return None
        return self.value / self.reference

    def line(self) -> str:
        ratio = "" if self.ratio is None else f"  ratio {self.ratio:6.2f} vs {self.reference_name}"
        target = f"  [target: {self.target}]" if self.target else ""
        return f"{self.name:<48} {self.value:12.3f} {self.unit:<10}{ratio}{target}"


def best_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux: ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DescendantPeakMemory:
    """Largest memory of any process below this one while the ``with`` block runs: worker
    processes of a pool, which ``RUSAGE_CHILDREN`` misses (they may be children of a
    forkserver that outlives the block) or mixes with earlier children.

    ``private_mb``: peak private memory (USS: pages no other process maps), what a worker adds
    to the machine's load; a forked worker shares the pages it inherited until one side writes
    them, and those are not counted. ``hwm_mb``: peak resident memory (VmHWM), shared pages
    included. A separate process polls /proc every ``interval`` seconds
    (``benchmarks/_memwatch.py``): a thread here would compete for the GIL with the work
    measured, and stop a pool from forking its workers. Linux only (elsewhere NaN).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.private_mb = self.hwm_mb = float("nan")
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> DescendantPeakMemory:
        if Path("/proc/self/smaps_rollup").exists():
            script = Path(__file__).with_name("_memwatch.py")
            self._proc = subprocess.Popen(
                [sys.executable, str(script), str(os.getpid()), str(self.interval)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            out, _ = self._proc.communicate("")
            if self._proc.returncode == 0 and len(out.split()) == 2:  # else NaN: no numbers
                self.private_mb, self.hwm_mb = map(float, out.split())
