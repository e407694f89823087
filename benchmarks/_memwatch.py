"""Watch the memory of a process's descendants until stdin closes; print the largest.

Run by :class:`benchmarks._common.DescendantPeakMemory` as a separate process, so that the
polling takes no lock (the GIL) from the process measured and starts no thread in it (a pool
forks its workers only from a process without other threads). Linux /proc only.

Usage: ``python _memwatch.py PID INTERVAL``; prints ``<peak private MiB> <peak VmHWM MiB>``.
"""

from __future__ import annotations

import os
import select
import sys


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:  # the process ended meanwhile
        return ""


def descendants(root: int) -> list[int]:
    """Process ids below ``root``, from each task's ``children`` list."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:  # the process ended meanwhile
            continue
        for tid in tasks:
            kids = [int(k) for k in _read(f"/proc/{pid}/task/{tid}/children").split()]
            out += kids
            todo += kids
    return out


def field_kib(text: str, *names: str) -> int:
    """Sum of the ``name:  N kB`` lines of a /proc status-like text."""
    total = 0
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in names:
            total += int(rest.split()[0])
    return total


def main(root: int, interval: float) -> None:
    me = os.getpid()
    private = hwm = 0
    while True:
        for pid in descendants(root):
            if pid == me:
                continue
            private = max(private, field_kib(_read(f"/proc/{pid}/smaps_rollup"),
                                             "Private_Clean", "Private_Dirty"))
            hwm = max(hwm, field_kib(_read(f"/proc/{pid}/status"), "VmHWM"))
        if select.select([sys.stdin], [], [], interval)[0] and not sys.stdin.read(1):
            break
    print(private / 1024, hwm / 1024, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
