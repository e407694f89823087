"""Populations: gating throughput, FlowSOM fit time, mapping new cells to a frozen clustering.

Cells are the cleaned events of a small simulated cohort, tiled to the benchmark size (1M
cells; 200k when quick), so the values, panel and template are the real ones. File reading
and cleanup are excluded. Each subject is measured with a reference in the same run:

- ``apply_gating`` (the default 20-population template) against one vectorised comparison
  of the same cells' gating markers with a threshold vector (``X > t``): the floor of any
  threshold gating; target >= 5M cells/s on one core;
- ``fit_clustering`` (balanced subsample of every cell here, batch SOM, 10×10 grid, 20
  metaclusters, annotation by a fitted gating) against flowsom's own estimator on the same
  array (our overhead: subsampling, gating fit, mapping, annotation); numba's one-off
  compile time is reported apart;
- ``Clustering.apply`` on as many new cells (chunked nearest node in numpy) against flowsom's
  mapping (``map_data_to_codes``, a scikit-learn BallTree query) on the same array.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import BenchResult, best_time, peak_rss_mb
from predictor.io.fcs import read_fcs
from predictor.io.panel import apply_panel, read_panel
from predictor.populations.clustering import fit_clustering
from predictor.populations.gating import apply_gating, fit_gating
from predictor.preprocess import cleanup
from predictor.simulate import simulate_cohort

N_SAMPLES = 10  # the fit's cells are spread over this many "samples"


def _cohort_cells() -> tuple[list[pd.DataFrame], object]:
    with tempfile.TemporaryDirectory(prefix="bench_pop_") as tmp:
        c = simulate_cohort(Path(tmp) / "c", n_patients=4, seed=1, cells_per_sample=4000)
        panel = read_panel(c.panel)
        out = []
        for row in pd.read_csv(c.samples).itertuples():
            res = cleanup(apply_panel(read_fcs(c.root / row.file, warn=False), panel), panel)
            out.append(res.cells)
    return out, panel


def _tile(cells: list[pd.DataFrame], n: int, seed: int) -> pd.DataFrame:
    """``n`` cells drawn (with replacement, plus a little noise) from the cohort's cells."""
    pooled = pd.concat(cells, ignore_index=True)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pooled), size=n)
    x = pooled.to_numpy(dtype=np.float32)[idx]
    x += rng.normal(0.0, 0.05, size=x.shape).astype(np.float32)
    return pd.DataFrame(x, columns=pooled.columns)


def run(quick: bool = False) -> list[BenchResult]:
    """Benchmark gating, FlowSOM fit and mapping on 1M cells (200k when ``quick``)."""
    os.environ.setdefault("NUMBA_NUM_THREADS", str(os.cpu_count() or 1))
    n = 200_000 if quick else 1_000_000
    size = f"{n // 1000}k cells"
    cohort, panel = _cohort_cells()
    big = _tile(cohort, n, seed=0)
    repeat = 5 if quick else 3

    # -- gating throughput (one core: numpy comparisons are single-threaded)
    gating = fit_gating(cohort, "default")
    arr = big[list(gating.markers)].to_numpy()
    thr = np.array([gating.thresholds["T cells"].get(m, 1.5) for m in gating.markers],
                   dtype=np.float32)
    t_gate = best_time(lambda: apply_gating(gating, big), repeat=repeat)
    t_cmp = best_time(lambda: arr > thr, repeat=repeat)
    t_fit_gate = best_time(lambda: fit_gating(cohort, "default"), repeat=repeat)

    # -- FlowSOM fit: warm numba up first (its compile time is a one-off per process)
    from flowsom.models import BatchFlowSOMEstimator
    from flowsom.models.batch import map_data_to_codes

    t0 = time.perf_counter()
    fit_clustering(cohort[:2], panel, max_cells_per_sample=1000, batch_som=True)
    t_compile = time.perf_counter() - t0
    parts = np.array_split(np.arange(n), N_SAMPLES)
    samples = [big.iloc[p].reset_index(drop=True) for p in parts]
    markers = panel.by_role("lineage")
    t0 = time.perf_counter()
    clustering = fit_clustering(samples, panel, max_cells_per_sample=len(parts[0]) + 1,
                                batch_som=True, random_state=0)
    t_fit = time.perf_counter() - t0
    x = np.ascontiguousarray(big[markers].to_numpy(dtype=np.float64))
    state = np.random.get_state()  # noqa: NPY002 - flowsom reseeds the global generator
    t0 = time.perf_counter()
    BatchFlowSOMEstimator(xdim=10, ydim=10, rlen=10, n_clusters=20, seed=0).fit(x)
    t_fit_ref = time.perf_counter() - t0
    np.random.set_state(state)  # noqa: NPY002

    # -- mapping new cells to the frozen clustering
    new = _tile(cohort, n, seed=1)
    x_new = np.ascontiguousarray(new[markers].to_numpy(dtype=np.float64))
    t_map = best_time(lambda: clustering.apply(new), repeat=repeat)
    t_map_ref = best_time(lambda: map_data_to_codes(x_new, clustering.codes), repeat=1)
    agree = float(np.mean(clustering.nodes(new) == map_data_to_codes(x_new, clustering.codes)[0]))

    return [
        BenchResult(f"apply_gating throughput ({size}, {len(gating.populations)} pops)",
                    n / t_gate / 1e6, "Mcells/s", reference=n / t_cmp / 1e6,
                    reference_name="one X > t pass", target=">= 5 Mcells/s"),
        BenchResult(f"fit_gating time ({sum(map(len, cohort)):,} cells pooled)", t_fit_gate,
                    "s", target="< 1 s"),
        BenchResult("numba compile, first FlowSOM fit in a process", t_compile, "s"),
        BenchResult(f"fit_clustering time ({size}, batch SOM 10x10, 20 MC)", t_fit, "s",
                    reference=t_fit_ref, reference_name="flowsom estimator fit",
                    target="ratio <= 1.3"),
        BenchResult(f"Clustering.apply throughput ({n // 1000}k new cells)", n / t_map / 1e6,
                    "Mcells/s", reference=n / t_map_ref / 1e6,
                    reference_name="flowsom BallTree mapping", target="ratio >= 1"),
        BenchResult("nearest node agrees with flowsom's mapping", 100 * agree, "%",
                    target=">= 99.9"),
        BenchResult("benchmark process peak RSS", peak_rss_mb(), "MiB"),
    ]


if __name__ == "__main__":
    for result in run(quick="--quick" in sys.argv):
        print(result.line())
