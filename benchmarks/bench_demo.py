"""End-to-end demo wall time, against a reference measured in the same run.

Reference: the time to just read every FCS file of the demo cohort once (the floor any
pipeline over these files pays). Target: the demo (simulate excluded, cohort cached) ≤ 3 min.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks._common import BenchResult
from predictor.demo import DEMO_CELLS, DEMO_PATIENTS, run_demo
from predictor.io.fcs import read_fcs


def run(quick: bool = False) -> list[BenchResult]:
    n = 30 if quick else DEMO_PATIENTS
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        res = run_demo(work, n_patients=n, cells_per_sample=DEMO_CELLS, permutations=50 if quick else None)
        total = time.perf_counter() - t0
        sheet = pd.read_csv(res.cohort / "samples.csv")
        t0 = time.perf_counter()
        for f in sheet["file"]:
            read_fcs(res.cohort / f, warn=False)
        read_all = time.perf_counter() - t0
        t = {**res.timings, **res.experiment.timings, **res.experiment.training.timings}
    out = [
        BenchResult(f"demo wall time ({n} patients, incl. simulate)", total, "s", read_all,
                    "reading all FCS once", "≤ 180 s"),
    ]
    for stage in ("simulate", "features", "cv", "permutation", "baselines", "bootstrap", "tracking", "score", "report"):
        if stage in t:
            out.append(BenchResult(f"  stage: {stage}", t[stage], "s", total, "demo total"))
    return out
