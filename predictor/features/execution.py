"""Where per-sample work runs: inline, a local process pool, or a Dask distributed cluster.

The same top-level task functions run everywhere; only small summaries travel back, and each
worker holds one sample at a time, so memory stays bounded to a few samples per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

from predictor.errors import ConfigError

__all__ = ["run_tasks"]


def _progress(it: Iterable, total: int, label: str | None) -> Iterable:
    if not label:
        return it
    from rich.progress import track

    return track(it, description=label, total=total, transient=True)


def run_tasks(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    *,
    n_jobs: int = 1,
    scheduler: str | None = None,
    progress: str | None = None,
) -> Iterator[Any]:
    """Run ``fn`` over ``jobs``; results are yielded as they complete (any order).

    Parameters
    ----------
    fn
        A picklable top-level function of one job.
    jobs
        The jobs.
    n_jobs
        Local worker processes (1 = inline, in this process).
    scheduler
        Address of a Dask distributed scheduler (``tcp://host:8786``); when given, the jobs
        run on that cluster instead of locally.
    progress
        Label of a progress bar; ``None`` shows none.
    """
    if scheduler:
        yield from _run_dask(fn, jobs, scheduler, progress)
        return
    if n_jobs <= 1 or len(jobs) <= 1:
        yield from _progress(map(fn, jobs), len(jobs), progress)
        return
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=get_context("forkserver")) as ex:
        futures = [ex.submit(fn, job) for job in jobs]
        try:
            for fut in _progress(as_completed(futures), len(futures), progress):
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()


def _run_dask(fn, jobs, address: str, progress: str | None) -> Iterator[Any]:
    try:
        from distributed import Client
        from distributed import as_completed as dask_completed
    except ImportError:  # pragma: no cover - distributed is a dependency
        raise ConfigError("Scheduling on a Dask cluster needs the 'distributed' package.") from None
    try:
        client = Client(address, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(
            f"Cannot reach the Dask scheduler at {address!r} ({exc}); check the address "
            "(e.g. tcp://host:8786) and that `dask scheduler` is running."
        ) from None
    try:
        futures = client.map(fn, list(jobs), pure=False)
        done = dask_completed(futures, loop=client.loop, with_results=False, raise_errors=True)
        for fut in _progress(done, len(futures), progress):
            yield client.gather(fut)
    finally:
        client.close()
