"""Benchmark of the synthetic cohort simulator (``predictor.simulate``).

Measures, in one run on one machine:

- the default demo cohort (60 patients × 4 samples × ~4,000 events): wall time and events/s,
  against writing the same number of random float32 events with ``write_fcs`` (the I/O floor);
- (not quick) one sample of 2 million events in a fresh process: wall time and peak resident
  memory, against the size of its float32 event matrix, to show memory stays bounded.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import BenchResult, best_time, peak_rss_mb
from predictor.io.fcs import write_fcs
from predictor.simulate import simulate_cohort

_BIG_SAMPLE = 2_000_000


def _cohort_events(root: Path) -> int:
    truth = pd.read_json(root / "truth.json", typ="series")
    return int(sum(truth["n_events"].values()))


def _write_random_like(root: Path, dest: Path) -> None:
    """Write random float32 events of the same shapes as the cohort's FCS files."""
    rng = np.random.default_rng(0)
    truth = pd.read_json(root / "truth.json", typ="series")
    pnn = list(pd.read_csv(root / "panel.csv")["channel"])
    for k, n in enumerate(truth["n_events"].values()):
        events = rng.random((int(n), len(pnn)), dtype=np.float32)
        write_fcs(dest / f"r{k}.fcs", events, pnn)


def _cohort_results(n_patients: int, repeat: int) -> list[BenchResult]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = {"k": 0}

        def simulate(n_jobs: int = 1) -> None:
            state["k"] += 1
            simulate_cohort(tmp / f"c{state['k']}", n_patients=n_patients, n_jobs=n_jobs)

        t_sim = best_time(simulate, repeat=repeat)
        root = tmp / "c1"
        n_events = _cohort_events(root)
        ref_dir = tmp / "ref"
        ref_dir.mkdir()
        t_ref = best_time(lambda: _write_random_like(root, ref_dir), repeat=repeat)
        t_par = best_time(lambda: simulate(n_jobs=2), repeat=1)
    label = f"simulate {n_patients} patients ({n_events:,} events)"
    return [
        BenchResult(f"{label}: time", t_sim, "s", target="<= 20 s for 60 patients on 2 cores"),
        BenchResult(f"{label}: time, n_jobs=2", t_par, "s", reference=t_sim,
                    reference_name="n_jobs=1", target="ratio < 1"),
        BenchResult(f"{label}: throughput", n_events / t_sim / 1e3, "kevents/s",
                    reference=n_events / t_ref / 1e3, reference_name="write_fcs random",
                    target="ratio >= 0.2"),
    ]


def _big_sample_child(path: str, n_events: int, queue) -> None:
    from predictor.simulate import _patient_params, _simulate_sample

    params = _patient_params(np.random.default_rng(1), "IL-7")
    task = {
        "seed_seq": np.random.SeedSequence(7), "params": params, "timepoint": "week6",
        "condition": "stim", "cells": n_events, "drift": np.ones(38), "path": Path(path),
        "labels_path": Path(path).with_suffix(".npy"), "sample_id": "big", "metadata": {},
    }
    t0 = time.perf_counter()
    res = _simulate_sample(task)
    queue.put((time.perf_counter() - t0, res["n_events"], peak_rss_mb()))


def _big_sample_results() -> list[BenchResult]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        proc = ctx.Process(target=_big_sample_child,
                           args=(str(Path(tmp) / "big.fcs"), _BIG_SAMPLE, queue))
        proc.start()
        elapsed, n_events, rss = queue.get()
        proc.join()
    matrix_mb = n_events * 38 * 4 / 2**20
    return [
        BenchResult(f"simulate one sample of {n_events:,} events: time", elapsed, "s"),
        BenchResult(f"simulate one sample of {n_events:,} events: peak RSS", rss, "MiB",
                    reference=matrix_mb, reference_name="float32 event matrix",
                    target="ratio <= 4"),
    ]


def run(quick: bool = False) -> list[BenchResult]:
    """Run the simulator benchmarks; ``quick`` uses a 12-patient cohort and skips the 2M sample."""
    if quick:
        return _cohort_results(12, repeat=1)
    return _cohort_results(60, repeat=1) + _big_sample_results()


if __name__ == "__main__":
    import sys

    for result in run(quick="--quick" in sys.argv):
        sys.stdout.write(result.line() + "\n")
