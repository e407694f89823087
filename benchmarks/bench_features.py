"""Feature extraction at cohort scale: read → clean → gate → statistics.

Cohort: 100 FCS files × 200k events × 38 channels (quick: 20 files × 50k). The simulator writes
16 distinct samples, which are copied to reach the file count. Reference, same run: reading the
same files once (target: the pipeline within 3× of it). Also: 1 vs 2 workers and the peak
resident memory of a worker process.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from benchmarks._common import BenchResult
from predictor.config import FeatureConfig
from predictor.features import extract_features
from predictor.io.fcs import read_fcs
from predictor.io.panel import read_panel
from predictor.io.samplesheet import read_sample_sheet
from predictor.simulate import simulate_cohort


def _cohort(root: Path, n_files: int, cells: int) -> pd.DataFrame:
    c = simulate_cohort(root / "base", n_patients=4, seed=11, cells_per_sample=cells, n_jobs=2)
    base = pd.read_csv(c.samples)
    rows = []
    for i in range(n_files):
        src = base.iloc[i % len(base)]
        pid = f"X{i // 4:03d}"
        sid = f"{pid}_{src['timepoint']}_{src['condition']}"
        dst = root / "fcs" / f"{sid}.fcs"
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(c.root / src["file"], dst)
        rows.append({"sample_id": sid, "patient_id": pid, "file": f"fcs/{sid}.fcs",
                     "timepoint": src["timepoint"], "condition": src["condition"], "batch": src["batch"]})
    pd.DataFrame(rows).to_csv(root / "samples.csv", index=False)
    shutil.copyfile(c.panel, root / "panel.csv")
    return read_sample_sheet(root / "samples.csv")


def _read_all(paths: list[str]) -> int:
    return sum(read_fcs(p, warn=False).n_events for p in paths)


def _child_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run(quick: bool = False) -> list[BenchResult]:
    n_files, cells = (20, 50_000) if quick else (100, 200_000)
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        root = Path(tmp)
        sheet = _cohort(root, n_files, cells)
        panel = read_panel(root / "panel.csv")
        paths = list(sheet["path"])
        # Reference: read every file once, in a worker process (same as the pipeline's reads).
        t0 = time.perf_counter()
        with ProcessPoolExecutor(1, mp_context=get_context("forkserver")) as ex:
            n_events = ex.submit(_read_all, paths).result()
        read_s = time.perf_counter() - t0
        timings = {}
        for workers in (1, 2):
            t0 = time.perf_counter()
            extract_features(sheet, panel, config=FeatureConfig(n_jobs=workers))
            timings[workers] = time.perf_counter() - t0
        peak = _child_peak_mb()
    return [
        BenchResult(f"features, {n_files} files × {cells // 1000}k events, 1 worker", timings[1], "s",
                    read_s, "reading the files once", "ratio ≤ 3"),
        BenchResult("features, 2 workers", timings[2], "s", timings[1], "1 worker", "ratio ≈ 0.5–0.6"),
        BenchResult("throughput, 2 workers", n_events / timings[2] / 1e6, "M events/s",
                    n_events / read_s / 1e6, "read throughput"),
        BenchResult("peak RSS of a worker process", peak, "MiB",
                    cells * 38 * 4 / 2**20, "one sample's event bytes"),
    ]
