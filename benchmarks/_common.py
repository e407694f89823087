"""Shared helpers of the benchmarks: timing, peak memory, and the result rows.

Every benchmark measures its subject *and* a reference in the same run, on the same machine,
and reports the ratio, so numbers from different machines can be compared.
"""

from __future__ import annotations

import os
import resource
import threading
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


def _descendants(root: int) -> list[int]:
    """Process ids below ``root`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class DescendantPeakRSS:
    """Largest peak resident memory (VmHWM) of any process below this one while the ``with``
    block runs: worker processes of a pool, which ``RUSAGE_CHILDREN`` misses (they are
    children of a forkserver that outlives the block) or mixes with earlier children.

    Polls /proc every ``interval`` seconds; a worker's peak is its high-water mark, so a poll
    late in its life sees it. Linux only (elsewhere the result is NaN).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = float("nan")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> DescendantPeakRSS:
        if Path("/proc/self/status").exists():
            self.peak_mb = 0.0
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def _poll(self) -> None:
        me = os.getpid()
        while True:
            for pid in _descendants(me):
                self.peak_mb = max(self.peak_mb, _peak_rss_kib(pid) / 1024)
            if self._stop.wait(self.interval):
                return
