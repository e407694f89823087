"""Where per-sample work runs: inline, a local process pool, or a Dask distributed cluster.

The same top-level task functions run everywhere; only small summaries travel back, and each
worker holds one sample at a time, so memory stays bounded to a few samples per worker.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

from predictor.errors import ConfigError

__all__ = ["TaskRunner"]


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
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.n_jobs, mp_context=_context(fn),
                                             initializer=_keep_freed_memory)
            # Starting workers blocks until the forkserver has imported the task's module
            # (~2 s): a thread waits for that while this process takes jobs itself.
            self._starting = threading.Thread(target=self._pool.submit, args=(os.getpid,),
                                              daemon=True)
            self._starting.start()
        yield from _progress(self._pool_map(fn, list(jobs)), len(jobs), progress)

    def _pool_map(self, fn: Callable[[Any], Any], jobs: list[Any]) -> Iterator[Any]:
        """Jobs on the pool; until its workers are up, this process works through jobs
        from the back of the list."""
        end = len(jobs)
        while end > 0 and self._starting.is_alive():
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


def _context(fn: Callable[[Any], Any]):
    """The forkserver context, with ``fn``'s module imported once in the server (before it
    starts): workers are then forked with numpy, pandas and scipy already loaded, instead of
    each importing them (~1.5 s) every time a pool starts."""
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
