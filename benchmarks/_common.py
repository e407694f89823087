"""Shared helpers of the benchmarks: timing, peak memory, and the result rows.

Every benchmark measures its subject *and* a reference in the same run, on the same machine,
and reports the ratio, so numbers from different machines can be compared.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass


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
