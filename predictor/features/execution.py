"""Where per-sample work runs: inline, a local process pool, or a Dask distributed cluster.

The same top-level task functions run everywhere; only small summaries travel back, and each
worker holds one sample at a time, so memory stays bounded to a few samples per worker.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from itertools import accumulate
from multiprocessing import get_context
from typing import Any

from predictor.errors import ConfigError
from predictor.io.fcs import will_need

__all__ = ["Prefetch", "TaskRunner"]


def _progress(it: Iterable, total: int, label: str | None) -> Iterable:
    if not label:
        return it
    from rich.progress import track

    return track(it, description=label, total=total, transient=True)


class TaskRunner:
    """Runs task functions inline, on a local process pool or on a Dask cluster.

    Use as a context manager; the pool (or the cluster connection) is opened on first use and
    then serves every :meth:`map` until the ``with`` block ends, so several passes over a
    cohort pay for starting worker processes once.

    Parameters
    ----------
    n_jobs
        Local worker processes (1 = inline, in this process).
    scheduler
        Address of a Dask distributed scheduler (``tcp://host:8786``); when given, the jobs
        run on that cluster instead of locally.
    """

    def __init__(self, n_jobs: int = 1, scheduler: str | None = None) -> None:
        self.n_jobs, self.scheduler = n_jobs, scheduler
        self._pool: ProcessPoolExecutor | None = None
        self._client = None
        self._starting: threading.Thread | None = None

    def __enter__(self) -> TaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._client is not None:
            self._client.close()

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], *,
            progress: str | None = None) -> Iterator[Any]:
        """Run ``fn`` over ``jobs``; results are yielded as they complete (any order).

        ``fn`` is a picklable top-level function of one job; ``progress`` labels a progress
        bar (``None`` shows none).
        """
        if self.scheduler:
            yield from self._map_dask(fn, jobs, progress)
            return
        if self.n_jobs <= 1 or len(jobs) <= 1:
            yield from _progress(map(fn, jobs), len(jobs), progress)
            return
        self.start(fn)
        yield from _progress(self._pool_map(fn, list(jobs)), len(jobs), progress)

    def start(self, fn: Callable[[Any], Any]) -> None:
        """Start the local pool now (for task function ``fn``), not at the first :meth:`map`:
        before another thread of this process starts, so the workers can be forked (see
        :func:`_context`). Does nothing inline, on a cluster, or when the pool is up."""
        if self._pool is not None or self.scheduler or self.n_jobs <= 1:
            return
        ctx = _context(fn)
        self._pool = ProcessPoolExecutor(max_workers=self.n_jobs, mp_context=ctx,
                                         initializer=_keep_freed_memory)
        if ctx.get_start_method() == "fork":
            with warnings.catch_warnings():
                # CPython warns about any other OS thread; _context checked that none runs
                # Python code. numpy's BLAS and Arrow's thread pools restart in the child.
                warnings.filterwarnings("ignore", r"This process .* is multi-threaded",
                                        DeprecationWarning)
                self._pool.submit(os.getpid)  # forks every worker now, from this thread
            return
        # Starting workers blocks until the forkserver has imported the task's module
        # (~1–2 s): a thread waits for that while this process takes jobs itself.
        self._starting = threading.Thread(target=self._pool.submit, args=(os.getpid,),
                                          daemon=True)
        self._starting.start()

    def _pool_map(self, fn: Callable[[Any], Any], jobs: list[Any]) -> Iterator[Any]:
        """Jobs on the pool; until forkserver workers are up, this process works through
        jobs from the back of the list."""
        end = len(jobs)
        while end > 0 and self._starting is not None and self._starting.is_alive():
            end -= 1
            yield fn(jobs[end])
        futures = [self._pool.submit(fn, job) for job in jobs[:end]]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()

    def _map_dask(self, fn, jobs, progress: str | None) -> Iterator[Any]:
        from distributed import as_completed as dask_completed

        if self._client is None:
            self._client = _dask_client(self.scheduler)
        client = self._client
        futures = client.map(fn, list(jobs), pure=False)
        done = dask_completed(futures, loop=client.loop, with_results=False, raise_errors=True)
        for fut in _progress(done, len(futures), progress):
            yield client.gather(fut)


class Prefetch:
    """Has the kernel read files from disk ahead of the workers that will read them.

    A thread asks for each file in turn (``posix_fadvise(WILLNEED)``: the kernel reads it into
    the page cache in the background) while at most ``budget`` bytes are asked for and not yet
    done with; :meth:`done` counts the files finished, in order. Workers then find the next
    files in memory instead of waiting for the disk, and the disk works while the gates are
    fitted. Local runs only (a Dask cluster's workers read on their own machines). Where the
    call is missing (not Linux), nothing happens. Use as a context manager (leaving it stops
    the thread) and :meth:`start` when the reading ahead should begin.

    Parameters
    ----------
    paths
        Files in the order they will be read.
    budget
        Bytes read ahead at most; by default a quarter of the available memory, at most 2 GiB.
    """

    def __init__(self, paths: Sequence[str], *, budget: int | None = None) -> None:
        self.paths = list(paths)
        sizes = []
        for p in self.paths:
            try:
                sizes.append(os.path.getsize(p))
            except OSError:  # reported by the worker that reads it
                sizes.append(0)
        self._end = list(accumulate(sizes))  # bytes of the files up to file i
        self.budget = _read_ahead_budget() if budget is None else int(budget)
        self._done = 0
        self._stop = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Prefetch:
        return self

    def start(self) -> None:
        """Start reading ahead (once; later calls do nothing)."""
        if self._thread is None and hasattr(os, "posix_fadvise") and self.paths:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def done(self, n: int = 1) -> None:
        """``n`` more files are finished with (their bytes leave the budget)."""
        with self._cond:
            self._done += n
            self._cond.notify()

    def _ahead(self, i: int) -> int:
        """Bytes asked for and not yet done with, once file ``i`` is asked for too."""
        finished = self._end[min(self._done, len(self._end)) - 1] if self._done else 0
        return self._end[i] - finished

    def _run(self) -> None:
        for i, path in enumerate(self.paths):
            with self._cond:  # the first file is always asked for, whatever its size
                while not self._stop and i > self._done and self._ahead(i) > self.budget:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                will_need(fd, [(0, os.fstat(fd).st_size)])
            except OSError:
                pass
            finally:
                os.close(fd)


def _read_ahead_budget() -> int:
    """A quarter of the memory available (Linux ``MemAvailable``), at most 2 GiB."""
    cap = 2 << 30
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return min(cap, int(line.split()[1]) * 1024 // 4)
    except (OSError, ValueError, IndexError):
        pass
    return cap // 4


def _context(fn: Callable[[Any], Any]):
    """How workers start. On Linux, when no other thread of this process runs Python code:
    forked from this process, in milliseconds, with all it imported (numba's kernels too)
    ready. A fork copies only the calling thread, so a lock another thread held would stay
    locked in the child: hence the condition (and :meth:`TaskRunner.start`, which forks
    before the read-ahead's thread starts). Otherwise the forkserver, with ``fn``'s module
    imported once in the server (before it starts): workers are then forked with numpy,
    pandas and scipy already loaded, instead of each importing them (~1 s) every time a
    pool starts; the first pool of a process waits for that import."""
    if sys.platform == "linux" and threading.active_count() == 1:
        return get_context("fork")
    ctx = get_context("forkserver")
    module = getattr(fn, "__module__", None)
    if module and module != "__main__":
        ctx.set_forkserver_preload([module])
    return ctx


def _keep_freed_memory() -> None:
    """In a worker process (glibc): serve large arrays from the heap and keep freed memory.

    By default glibc maps every allocation over 32 MiB afresh and unmaps it when freed, so each
    sample's event arrays (~40 MiB) pay for faulting in and zeroing new pages; reusing the
    freed ones saves ~5 ms per 200k-event sample. The worker's memory stays bounded by its
    largest sample. Elsewhere (no glibc) this does nothing.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _dask_client(address: str):
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - distributed is a dependency
        raise ConfigError("Scheduling on a Dask cluster needs the 'distributed' package.") from None
    try:
        return Client(address, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(
            f"Cannot reach the Dask scheduler at {address!r} ({exc}); check the address "
            "(e.g. tcp://host:8786) and that `dask scheduler` is running."
        ) from None
