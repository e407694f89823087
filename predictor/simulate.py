"""Synthetic IL-7 trial cohort: CyTOF FCS files with known cell identities and outcomes.

The simulator writes a small randomised trial that looks like the sipuleucel-T → IL-7 study
(DESIGN §1): every patient has PBMC profiled at ``baseline`` and ``week6``, each unstimulated
(``unstim``) and after PMA/ionomycin (``stim``), so four FCS files per patient. Half the patients
get IL-7 (arm ``IL-7``), the others are observed (arm ``observation``).

Cells
-----
Fourteen PBMC subsets (CD4 T naive/memory, Treg, CD8 T naive/memory, γδ T, CD56bright and
CD56dim NK, B cells, classical/intermediate/non-classical monocytes, mDC, pDC) plus four kinds
of non-cell events (normalisation beads, debris, dead cells, doublets; ~12% together).
Each subset has a marker profile on the arcsinh(x/5) scale; a cell's expected count is
``5·sinh(level)`` times a per-cell log-normal factor, a per-batch multiplicative drift and a
per-patient shift, and its recorded value is a Poisson draw minus a uniform(0, 1) jitter on
non-zero counts (as CyTOF software does), with extra zeros for negative markers. Functional
markers (cytokines, GzmB, perforin, Ki-67, PD-1) are bimodal: a cell is positive with a
probability that depends on the subset, the condition, the patient and the treatment.
Subset frequencies vary between patients (logistic-normal), and slightly between timepoints.

IL-7 biology (week 6, IL-7 arm only; each patient has an IL-7 responsiveness ``r`` and each
effect its own per-patient magnitude around ``r``)
------------------------------------------------------------------------------------------
CD8 T cells expand (≈1.5–2.5×) and so do CD56bright NK cells; monocytes fall but make more
TNFα; after stimulation CD4 T cells make more IL-2, TNFα and IL-6 (without being more
numerous), CD8 T cells more IFNγ, NK cells more TNFα and γδ T cells more IL-2; Ki-67 rises and
CD127 (IL-7Rα) falls on T cells. The observation arm changes only by noise.

Outcome model
-------------
Driver values are measured on the simulated events themselves (true identities, arcsinh(x/5)
of the written float32 values; ``frac_pos`` = fraction of cells with a value > 2.0; ``pct_live``
= % of live singlet cells, ``pct_parent`` = % of the parent population, e.g. Treg % of CD4 T).
Changes Δ = week6 − baseline are taken on the pipeline's scale (DESIGN §3): a log2 ratio for
frequencies (pseudo-count 0.01 % for ``pct_live``), a difference for fractions and medians.
Each driver is standardised, ``z = (v - centre) / scale``; for prognostic terms centre and scale
are the mean and SD over all patients; for IL-7 (predictive) terms the centre is 0 (no
on-treatment change, no benefit) and the scale the root mean square over the IL-7 arm. Both are
stored in ``truth.json``. The linear predictor of patient *i* is::

    lp_i = -0.9
           - 0.8·z(Treg % of CD4 T, baseline unstim)                    prognostic, linear
           - 3.2·max(0, z(Monocytes % live, baseline unstim) - 0.5)     prognostic, hinge
           - 0.6·z(CD8 T PD-1 frac+, baseline unstim)                    prognostic, linear
           + [IL-7]·( 2.2·z(Δ CD8 T % live, unstim)                     predictive, linear
                    + 0.8·z(Δ CD4 T IL-2 frac+, stim)                   predictive, linear
                    + 0.6·z(Δ NK TNFα frac+, stim)·z(Δ CD8 T IFNγ frac+, stim) )  interaction
           + u_i,   u_i ~ N(0, 0.5²)  (unmeasured factors)

A latent immunosuppression score per patient raises Tregs, monocytes and PD-1 on CD8 memory T
cells together, so the prognostic drivers are correlated as in advanced cancer; PD-1 on CD4
memory T cells and Tregs varies between patients independently of it. ``response ~ Bernoulli(expit(lp))``.
Survival follows a Weibull model with the same linear predictor (shape 1.4, hazard
∝ exp(−0.8·lp), median 20 months at lp = 0) and uniform administrative censoring between 12 and
48 months. ``age`` and ``psa_baseline`` are uninformative covariates. ``truth.json`` holds every
generating parameter, the per-patient drivers, linear predictors and probabilities, and
``best_auroc``: the expected AUROC of the true probabilities against outcomes drawn from them.

Determinism: every patient and every sample has its own :class:`numpy.random.SeedSequence`
spawned from ``seed``, so the files are byte-identical whatever ``n_jobs`` is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from predictor.errors import ConfigError, OutputExistsError
from predictor.features.matrix import timepoint_change
from predictor.io.fcs import write_fcs

__all__ = ["SimulatedCohort", "simulate_cohort", "POPULATIONS", "FRAC_POS_THRESHOLD"]

COFACTOR = 5.0
FRAC_POS_THRESHOLD = 2.0
TIMEPOINTS = ("baseline", "week6")
CONDITIONS = ("unstim", "stim")
_CHUNK = 200_000  # events generated at once; fixed so results do not depend on memory

# ---------------------------------------------------------------------------------------------
# Panel: (marker, channel, role); FCS column order is Time, Event_length, then by mass.
# ---------------------------------------------------------------------------------------------
_PANEL = (
    ("CD45", "Y89Di", "lineage"),
    ("CD3", "Er170Di", "lineage"),
    ("CD4", "Nd145Di", "lineage"),
    ("CD8a", "Nd146Di", "lineage"),
    ("TCRgd", "Sm152Di", "lineage"),
    ("CD56", "Yb176Di", "lineage"),
    ("CD16", "Bi209Di", "lineage"),
    ("CD14", "Gd160Di", "lineage"),
    ("CD19", "Nd142Di", "lineage"),
    ("CD20", "Sm147Di", "lineage"),
    ("HLA-DR", "Yb174Di", "lineage"),
    ("CD11c", "Dy162Di", "lineage"),
    ("CD123", "Dy163Di", "lineage"),
    ("CD25", "Tm169Di", "lineage"),
    ("CD127", "Sm149Di", "lineage"),
    ("CD45RA", "Nd143Di", "lineage"),
    ("CCR7", "Er167Di", "lineage"),
    ("CD27", "Gd155Di", "lineage"),
    ("IL-2", "Nd150Di", "functional"),
    ("TNFa", "Yb172Di", "functional"),
    ("IFNg", "Gd158Di", "functional"),
    ("IL-6", "Er166Di", "functional"),
    ("IL-17A", "Yb171Di", "functional"),
    ("MIP-1b", "Nd148Di", "functional"),
    ("GzmB", "Yb173Di", "functional"),
    ("Perforin", "Dy164Di", "functional"),
    ("Ki-67", "Er168Di", "functional"),
    ("PD-1", "Tb159Di", "functional"),
    ("DNA1", "Ir191Di", "dna"),
    ("DNA2", "Ir193Di", "dna"),
    ("Cisplatin", "Pt195Di", "viability"),
    ("Bead_Ce140", "Ce140Di", "bead"),
    ("Bead_Eu151", "Eu151Di", "bead"),
    ("Bead_Eu153", "Eu153Di", "bead"),
    ("Bead_Ho165", "Ho165Di", "bead"),
    ("Bead_Lu175", "Lu175Di", "bead"),
    ("Time", "Time", "time"),
    ("Event_length", "Event_length", "event_length"),
)

# ---------------------------------------------------------------------------------------------
# Populations: (code, name, major). Leaf cells first, then non-cell events.
# ---------------------------------------------------------------------------------------------
POPULATIONS = (
    (0, "CD4 T naive", "CD4 T"),
    (1, "CD4 T memory", "CD4 T"),
    (2, "Treg", "CD4 T"),
    (3, "CD8 T naive", "CD8 T"),
    (4, "CD8 T memory", "CD8 T"),
    (5, "gd T", "gd T"),
    (6, "CD56bright NK", "NK"),
    (7, "CD56dim NK", "NK"),
    (8, "B cells", "B cells"),
    (9, "Classical mono", "Monocytes"),
    (10, "Intermediate mono", "Monocytes"),
    (11, "Non-classical mono", "Monocytes"),
    (12, "mDC", "DC"),
    (13, "pDC", "DC"),
    (14, "bead", "non-cell"),
    (15, "debris", "non-cell"),
    (16, "dead", "non-cell"),
    (17, "doublet", "non-cell"),
)
_N_LEAF = 14
_BEAD, _DEBRIS, _DEAD, _DOUBLET = 14, 15, 16, 17

# % of live CD45+ cells, population means (sum to 100).
_BASE_FREQ = (
    15.0, 18.0, 2.5,  # CD4 naive, memory, Treg  -> ~35.5
    9.0, 10.0,  # CD8 naive, memory -> ~19
    3.0,  # gd T
    0.8, 9.5,  # NK bright, dim -> ~10.3
    8.5,  # B
    11.0, 1.2, 1.8,  # monocytes -> 14
    1.1, 0.6,  # mDC, pDC
)
# Between-patient SD of the log frequency of each subset.
_FREQ_SD = (0.25, 0.3, 0.3, 0.3, 0.4, 0.5, 0.4, 0.35, 0.35, 0.3, 0.4, 0.4, 0.3, 0.35)
# Non-cell events: fraction of all events (bead, debris, dead, doublet), mean.
_NONCELL_FRAC = (0.03, 0.04, 0.03, 0.03)

# Groups of leaf codes named as in the feature vocabulary.
_GROUPS = {
    "CD4 T": (0, 1, 2),
    "CD8 T": (3, 4),
    "gd T": (5,),
    "Treg": (2,),
    "NK": (6, 7),
    "CD56bright NK": (6,),
    "CD56dim NK": (7,),
    "B cells": (8,),
    "Monocytes": (9, 10, 11),
    "Classical mono": (9,),
    "mDC": (12,),
    "pDC": (13,),
}
_PARENTS = {
    "CD4 T": (0, 1, 2, 3, 4, 5),
    "CD8 T": (0, 1, 2, 3, 4, 5),
    "gd T": (0, 1, 2, 3, 4, 5),
    "Treg": (0, 1, 2),
    "NK": tuple(range(_N_LEAF)),
    "CD56bright NK": (6, 7),
    "CD56dim NK": (6, 7),
    "B cells": tuple(range(_N_LEAF)),
    "Monocytes": tuple(range(_N_LEAF)),
    "Classical mono": (9, 10, 11),
    "mDC": (12, 13),
    "pDC": (12, 13),
}
_PARENT_NAMES = {
    "CD4 T": "T cells", "CD8 T": "T cells", "gd T": "T cells", "Treg": "CD4 T",
    "NK": "live", "CD56bright NK": "NK", "CD56dim NK": "NK", "B cells": "live",
    "Monocytes": "live", "Classical mono": "Monocytes", "mDC": "DC", "pDC": "DC",
}

_ZERO_INFLATION = 0.3  # extra zeros: probability for signals with expected count < 3
_NEG = 0.15  # arcsinh level of a negative marker (expected count ~0.75)

# Surface profiles: marker -> level, or (level_pos, fraction_pos) for bimodal markers.
_CD45 = {"CD45": 4.6}
_PROFILES: dict[int, dict[str, float | tuple[float, float]]] = {
    0: {**_CD45, "CD3": 4.0, "CD4": 3.6, "CD45RA": 3.8, "CCR7": 3.1, "CD27": 3.5,
        "CD127": 3.1, "CD25": 1.0, "CD8a": _NEG},
    1: {**_CD45, "CD3": 4.0, "CD4": 3.6, "CD45RA": (3.3, 0.08), "CCR7": (3.0, 0.5),
        "CD27": (3.2, 0.75), "CD127": 2.8, "CD25": 1.5, "HLA-DR": (3.0, 0.12)},
    2: {**_CD45, "CD3": 3.9, "CD4": 3.4, "CD25": 3.7, "CD127": 0.7, "CD45RA": (3.3, 0.3),
        "CCR7": (3.0, 0.6), "CD27": 3.2, "HLA-DR": (3.0, 0.2)},
    3: {**_CD45, "CD3": 4.1, "CD8a": 4.5, "CD45RA": 3.9, "CCR7": 3.0, "CD27": 3.5,
        "CD127": 2.9},
    4: {**_CD45, "CD3": 4.1, "CD8a": 4.5, "CD45RA": (3.5, 0.35), "CCR7": (2.8, 0.15),
        "CD27": (3.1, 0.55), "CD127": 2.1, "HLA-DR": (3.0, 0.2), "CD56": (2.5, 0.1),
        "CD16": (2.3, 0.05)},
    5: {**_CD45, "CD3": 4.3, "TCRgd": 4.2, "CD8a": (2.8, 0.3), "CD45RA": (3.3, 0.6),
        "CD27": (3.0, 0.5), "CD127": 2.2, "CD16": (2.5, 0.2), "CD56": (2.5, 0.25)},
    6: {"CD45": 4.3, "CD56": 4.6, "CD16": (2.0, 0.2), "CD127": 1.8, "CD27": 1.8,
        "CD45RA": 2.8, "CD8a": (2.0, 0.2), "HLA-DR": (2.5, 0.15)},
    7: {"CD45": 4.3, "CD56": 2.9, "CD16": 4.3, "CD45RA": 3.6, "CD8a": (2.5, 0.35),
        "CD27": 0.4},
    8: {"CD45": 4.3, "CD19": 3.5, "CD20": 4.6, "HLA-DR": 4.6, "CD45RA": 3.8,
        "CD27": (3.1, 0.3), "CCR7": 2.4, "CD123": 0.6, "CD25": (2.4, 0.15)},
    9: {"CD45": 4.3, "CD14": 5.1, "CD16": 0.6, "HLA-DR": 3.6, "CD11c": 4.1, "CD4": 2.0,
        "CD123": 1.2, "CD45RA": 0.8},
    10: {"CD45": 4.4, "CD14": 4.1, "CD16": 3.2, "HLA-DR": 4.4, "CD11c": 4.3, "CD4": 2.0,
         "CD123": 1.0, "CD45RA": 1.0},
    11: {"CD45": 4.5, "CD14": 1.6, "CD16": 4.3, "HLA-DR": 3.8, "CD11c": 4.0, "CD4": 1.6,
         "CD45RA": 1.8},
    12: {"CD45": 4.2, "HLA-DR": 4.6, "CD11c": 3.9, "CD14": 0.3, "CD123": 1.4, "CD4": 1.6,
         "CD45RA": 1.2},
    13: {"CD45": 4.1, "HLA-DR": 4.1, "CD123": 4.6, "CD11c": 0.3, "CD4": 2.2, "CD45RA": 3.5},
}
# Constitutive functional markers: (level_pos, fraction_pos) per subset.
_CONSTITUTIVE: dict[int, dict[str, tuple[float, float]]] = {
    0: {"Ki-67": (3.0, 0.01)},
    1: {"Ki-67": (3.0, 0.03), "PD-1": (2.9, 0.2), "GzmB": (3.0, 0.03)},
    2: {"Ki-67": (3.0, 0.06), "PD-1": (2.9, 0.2)},
    3: {"Ki-67": (3.0, 0.01)},
    4: {"Ki-67": (3.0, 0.03), "PD-1": (3.0, 0.25), "GzmB": (4.0, 0.55),
        "Perforin": (3.6, 0.45)},
    5: {"Ki-67": (3.0, 0.03), "GzmB": (3.8, 0.5), "Perforin": (3.4, 0.4)},
    6: {"GzmB": (3.0, 0.5), "Perforin": (2.8, 0.3), "Ki-67": (3.0, 0.05)},
    7: {"GzmB": (4.5, 0.95), "Perforin": (4.1, 0.9), "Ki-67": (3.0, 0.02)},
    8: {"Ki-67": (3.0, 0.01)},
    12: {"GzmB": (2.6, 0.05)},
    13: {"GzmB": (3.2, 0.4)},
}
_CYTOKINES = ("IL-2", "TNFa", "IFNg", "IL-6", "IL-17A", "MIP-1b")
_CYTOKINE_LEVEL = {"IL-2": 3.4, "TNFa": 3.6, "IFNg": 3.5, "IL-6": 3.1, "IL-17A": 3.0,
                   "MIP-1b": 3.8}
# Fraction cytokine-positive after PMA/ionomycin, per subset (missing: 0.005).
_STIM: dict[int, dict[str, float]] = {
    0: {"IL-2": 0.25, "TNFa": 0.3, "IFNg": 0.02, "IL-6": 0.03, "MIP-1b": 0.02},
    1: {"IL-2": 0.4, "TNFa": 0.5, "IFNg": 0.15, "IL-6": 0.05, "IL-17A": 0.03,
        "MIP-1b": 0.08},
    2: {"IL-2": 0.04, "TNFa": 0.12, "IFNg": 0.02},
    3: {"IL-2": 0.05, "TNFa": 0.12, "IFNg": 0.04, "MIP-1b": 0.1},
    4: {"IL-2": 0.1, "TNFa": 0.4, "IFNg": 0.3, "MIP-1b": 0.55},
    5: {"IL-2": 0.08, "TNFa": 0.45, "IFNg": 0.45, "MIP-1b": 0.5, "IL-17A": 0.03},
    6: {"TNFa": 0.2, "IFNg": 0.3, "MIP-1b": 0.4},
    7: {"TNFa": 0.15, "IFNg": 0.25, "MIP-1b": 0.65},
    8: {"TNFa": 0.1, "IL-6": 0.05, "IL-2": 0.02},
    9: {"TNFa": 0.25, "IL-6": 0.12, "MIP-1b": 0.35},
    10: {"TNFa": 0.35, "IL-6": 0.15, "MIP-1b": 0.4},
    11: {"TNFa": 0.3, "IL-6": 0.08, "MIP-1b": 0.2},
    12: {"TNFa": 0.25, "IL-6": 0.1},
    13: {"TNFa": 0.2},
}
_UNSTIM_CYTOKINE = 0.005
_MONO_UNSTIM = {"TNFa": 0.02, "IL-6": 0.02}  # monocytes are a little active at rest

# IL-7 effects (week 6, IL-7 arm), each scaled by a per-patient magnitude around r.
_IL7 = {
    "cd8_fold": 1.0,  # CD8 T frequency × (1 + 1.0·m)
    "nk_bright_fold": 0.7,  # CD56bright NK × (1 + 0.7·m)
    "mono_fold": 0.45,  # monocytes × 1 / (1 + 0.45·m)
    "cd4_cytokines_logit": 0.9,  # CD4 T IL-2, TNFa, IL-6 after stim
    "cd8_ifng_logit": 1.0,
    "nk_tnfa_logit": 1.1,
    "gd_il2_logit": 1.5,
    "mono_tnfa_logit": 0.8,
    "t_ki67_logit": 1.5,
    "t_cd127_level": -0.5,
    "r_sd": 0.35,  # log-sd of the patient responsiveness r (shared by all effects)
    "effect_sd": 0.25,  # log-sd of each effect's own magnitude around r
    "max_effect": 2.2,  # magnitudes are capped (CD8 T at most ×3.2 before renormalising)
}

# Latent immunosuppression (per patient, N(0, 1)): its loadings.
# PD-1 on CD8 memory follows the latent state; on CD4 memory and Tregs it varies on its own
# (``cd4_pd1_sd``), so only CD8 T cells carry the prognostic PD-1 signal.
_SUPPRESSION = {"treg_log_freq": 0.3, "mono_log_freq": 0.25, "pd1_logit": 0.6, "pd1_sd": 0.35,
                "cd4_pd1_sd": 0.7}

# Outcome model (see module docstring).
_OUTCOME = {
    "intercept": -0.9,
    "treatment": 0.0,
    "noise_sd": 0.5,
    "weibull_shape": 1.4,
    "weibull_median_months": 20.0,
    "hazard_lp_coef": 0.8,
    "censor_months": (12.0, 48.0),
}
_DRIVERS = (
    {"population": "Treg", "marker": None, "statistic": "pct_parent", "condition": "unstim",
     "timepoint": "baseline", "weight": -0.8, "form": "linear", "arm": "all"},
    {"population": "Monocytes", "marker": None, "statistic": "pct_live", "condition": "unstim",
     "timepoint": "baseline", "weight": -3.2, "form": "hinge", "knot": 0.5, "arm": "all"},
    {"population": "CD8 T", "marker": "PD-1", "statistic": "frac_pos", "condition": "unstim",
     "timepoint": "baseline", "weight": -0.6, "form": "linear", "arm": "all"},
    {"population": "CD8 T", "marker": None, "statistic": "pct_live", "condition": "unstim",
     "timepoint": "week6-baseline", "weight": 2.2, "form": "linear", "arm": "IL-7"},
    {"population": "CD4 T", "marker": "IL-2", "statistic": "frac_pos", "condition": "stim",
     "timepoint": "week6-baseline", "weight": 0.8, "form": "linear", "arm": "IL-7"},
    {"population": "NK", "marker": "TNFa", "statistic": "frac_pos", "condition": "stim",
     "timepoint": "week6-baseline", "weight": 0.6, "form": "interaction", "arm": "IL-7",
     "with": {"population": "CD8 T", "marker": "IFNg", "statistic": "frac_pos",
              "condition": "stim", "timepoint": "week6-baseline"}},
)


@dataclass(frozen=True)
class SimulatedCohort:
    """Paths of a simulated cohort written by :func:`simulate_cohort`.

    Attributes
    ----------
    root : Path
        The output folder.
    samples, clinical, panel, truth : Path
        ``samples.csv``, ``clinical.csv``, ``panel.csv`` and ``truth.json`` in ``root``.
    """

    root: Path
    samples: Path
    clinical: Path
    panel: Path
    truth: Path


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _check_int(name: str, value: object, low: int, extra: Iterable[int] = ()) -> int:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if ok and (value >= low or value in tuple(extra)):
        return int(value)
    allowed = f"an int >= {low}" + "".join(f" or {e}" for e in extra)
    raise ConfigError(
        f"The '{name}' parameter of simulate_cohort must be {allowed}. Got {value!r} instead."
    )


def _validate(out, n_patients, seed, cells_per_sample, n_batches, id_prefix, overwrite,
              n_jobs) -> tuple[Path, int]:
    if not isinstance(out, str | os.PathLike):
        raise ConfigError(
            f"The 'out' parameter of simulate_cohort must be a str or path. Got {out!r} instead."
        )
    _check_int("n_patients", n_patients, 4)
    _check_int("seed", seed, 0)
    _check_int("cells_per_sample", cells_per_sample, 200)
    _check_int("n_batches", n_batches, 1)
    if n_batches > n_patients:
        raise ConfigError(
            "The 'n_batches' parameter of simulate_cohort must be an int <= n_patients "
            f"({n_patients}). Got {n_batches!r} instead."
        )
    n_jobs = _check_int("n_jobs", n_jobs, 1, extra=(-1,))
    if not isinstance(id_prefix, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,15}", id_prefix):
        raise ConfigError(
            "The 'id_prefix' parameter of simulate_cohort must be a str of 1-16 letters, digits "
            f"or '-' starting with a letter. Got {id_prefix!r} instead."
        )
    if not isinstance(overwrite, bool):
        raise ConfigError(
            f"The 'overwrite' parameter of simulate_cohort must be a bool. Got {overwrite!r} "
            "instead."
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"{out}: exists and is not a folder. Choose another --out folder."
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out}: folder is not empty. Choose an empty or new folder, or pass overwrite=True "
            "(--overwrite) to replace it."
        )
    if n_jobs == -1:
        n_jobs = os.cpu_count() or 1
    return out, n_jobs


# ---------------------------------------------------------------------------------------------
# Panel tables
# ---------------------------------------------------------------------------------------------
def _channel_order() -> list[int]:
    """Indices into _PANEL in FCS column order: Time, Event_length, then by mass."""
    def mass(ch: str) -> int:
        m = re.search(r"(\d+)", ch)
        return int(m.group(1)) if m else 0

    special = [i for i, p in enumerate(_PANEL) if p[2] in ("time", "event_length")]
    rest = sorted((i for i in range(len(_PANEL)) if i not in special),
                  key=lambda i: mass(_PANEL[i][1]))
    return special + rest


def _pns(marker: str, channel: str, role: str) -> str:
    if role in ("time", "event_length"):
        return ""
    m = re.fullmatch(r"([A-Z][a-z]?)(\d+)Di", channel)
    label = {"bead": "Beads", "dna": marker, "viability": "Cisplatin"}.get(role, marker)
    return f"{m.group(2)}{m.group(1)}_{label}"


def _panel_frame() -> pd.DataFrame:
    rows = [_PANEL[i] for i in _channel_order()]
    return pd.DataFrame({
        "channel": [r[1] for r in rows],
        "marker": [r[0] for r in rows],
        "role": [r[2] for r in rows],
        "cofactor": [COFACTOR] * len(rows),
    })


# ---------------------------------------------------------------------------------------------
# Cohort design and per-patient parameters
# ---------------------------------------------------------------------------------------------
def _patient_ids(n: int, prefix: str) -> list[str]:
    width = max(3, len(str(n)))
    return [f"{prefix}{i + 1:0{width}d}" for i in range(n)]


def _design(n_patients: int, n_batches: int, rng: np.random.Generator) -> dict:
    arms = np.array(["IL-7"] * ((n_patients + 1) // 2) + ["observation"] * (n_patients // 2))
    arms = arms[rng.permutation(n_patients)]
    batches = (np.arange(n_patients) % n_batches)[rng.permutation(n_patients)]
    drift = np.exp(rng.normal(0.0, 0.12, size=(n_batches, len(_PANEL))))
    drift *= np.exp(rng.normal(0.0, 0.08, size=(n_batches, 1)))  # overall sensitivity
    return {"arms": arms, "batches": batches, "drift": drift}


def _marker_index() -> dict[str, int]:
    return {p[0]: i for i, p in enumerate(_PANEL)}


def _patient_params(rng: np.random.Generator, arm: str) -> dict:
    """Draw one patient's biology: frequencies, expression shifts, cytokine propensities."""
    n_m = len(_PANEL)
    log_freq = np.log(np.array(_BASE_FREQ)) + rng.normal(0.0, 1.0, _N_LEAF) * np.array(_FREQ_SD)
    shift = rng.normal(0.0, 0.12, size=(_N_LEAF, n_m))  # expression level shifts
    cyto_logit = rng.normal(0.0, 0.45, size=(_N_LEAF, len(_CYTOKINES)))
    # A latent immunosuppressed state raises Tregs, monocytes and PD-1 together.
    supp = float(rng.normal())
    log_freq[2] += _SUPPRESSION["treg_log_freq"] * supp
    log_freq[[9, 10, 11]] += _SUPPRESSION["mono_log_freq"] * supp
    pd1_logit = _SUPPRESSION["pd1_logit"] * supp + rng.normal(0.0, _SUPPRESSION["pd1_sd"])
    week6_noise = {
        "log_freq": rng.normal(0.0, 0.1, _N_LEAF),
        "cyto_logit": rng.normal(0.0, 0.15, size=(_N_LEAF, len(_CYTOKINES))),
    }
    r = float(np.exp(rng.normal(0.0, _IL7["r_sd"])))
    effects = {k: min(r * float(np.exp(rng.normal(0.0, _IL7["effect_sd"]))), _IL7["max_effect"])
               for k in _IL7 if k not in ("r_sd", "effect_sd", "max_effect")}
    noncell = np.array(_NONCELL_FRAC) * np.exp(rng.normal(0.0, 0.25, 4))
    noncell_w6 = np.array(_NONCELL_FRAC) * np.exp(rng.normal(0.0, 0.25, 4))
    cd4_pd1_logit = float(rng.normal(0.0, _SUPPRESSION["cd4_pd1_sd"]))
    return {
        "arm": arm, "log_freq": log_freq, "shift": shift, "cyto_logit": cyto_logit,
        "pd1_logit": pd1_logit, "cd4_pd1_logit": cd4_pd1_logit, "week6_noise": week6_noise, "r": r, "suppression": supp,
        "effects": effects if arm == "IL-7" else dict.fromkeys(effects, 0.0),
        "noncell": {"baseline": noncell, "week6": noncell_w6},
    }


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def _sample_profile(params: dict, timepoint: str, condition: str) -> dict:
    """Per-sample arrays: leaf frequencies and per (subset, channel) level_pos, q, level_neg."""
    idx = _marker_index()
    n_m = len(_PANEL)
    eff = params["effects"] if timepoint == "week6" else dict.fromkeys(params["effects"], 0.0)
    log_freq = params["log_freq"].copy()
    cyto_logit = params["cyto_logit"].copy()
    if timepoint == "week6":
        log_freq += params["week6_noise"]["log_freq"]
        cyto_logit += params["week6_noise"]["cyto_logit"]
    log_freq[[3, 4]] += np.log1p(_IL7["cd8_fold"] * eff["cd8_fold"])
    log_freq[6] += np.log1p(_IL7["nk_bright_fold"] * eff["nk_bright_fold"])
    log_freq[[9, 10, 11]] -= np.log1p(_IL7["mono_fold"] * eff["mono_fold"])
    freq = np.exp(log_freq)
    freq /= freq.sum()

    lpos = np.full((_N_LEAF, n_m), _NEG)
    q = np.zeros((_N_LEAF, n_m))
    lneg = np.full((_N_LEAF, n_m), _NEG)
    for code, prof in _PROFILES.items():
        for marker, spec in prof.items():
            level, frac = spec if isinstance(spec, tuple) else (spec, 1.0)
            lpos[code, idx[marker]] = level
            q[code, idx[marker]] = frac
    lpos += params["shift"]
    for code, prof in _CONSTITUTIVE.items():
        for marker, (level, frac) in prof.items():
            j = idx[marker]
            lpos[code, j] = level + params["shift"][code, j]
            q[code, j] = frac
    # PD-1 propensity (patient), Ki-67 and CD127 under IL-7 in T cells.
    t_cells = [0, 1, 2, 3, 4, 5]
    j = idx["PD-1"]
    shift = np.where(np.isin(np.arange(_N_LEAF), _GROUPS["CD8 T"]), params["pd1_logit"],
                     params["cd4_pd1_logit"])
    q[:, j] = np.where(q[:, j] > 0, _expit(_logit(np.clip(q[:, j], 1e-3, 0.999)) + shift), 0.0)
    j = idx["Ki-67"]
    q[t_cells, j] = _expit(_logit(q[t_cells, j]) + _IL7["t_ki67_logit"] * eff["t_ki67_logit"])
    lpos[t_cells, idx["CD127"]] += _IL7["t_cd127_level"] * eff["t_cd127_level"]
    # Cytokines.
    for c, name in enumerate(_CYTOKINES):
        j = idx[name]
        lpos[:, j] = _CYTOKINE_LEVEL[name] + params["shift"][:, j]
        for code in range(_N_LEAF):
            if condition == "stim":
                base = _STIM.get(code, {}).get(name, _UNSTIM_CYTOKINE)
            elif code in (9, 10, 11):
                base = _MONO_UNSTIM.get(name, _UNSTIM_CYTOKINE)
            else:
                base = _UNSTIM_CYTOKINE
            logit = _logit(base) + cyto_logit[code, c]
            if condition == "stim":
                logit += _il7_cytokine_shift(code, name, eff)
            q[code, j] = _expit(logit)
    if condition == "stim":  # PMA internalises CD4 and CD14 a little
        lpos[:, idx["CD4"]] -= 0.4
        lpos[:, idx["CD14"]] -= 0.3
    # DNA, viability, beads for live singlet cells.
    lpos[:, idx["DNA1"]] = 5.4
    lpos[:, idx["DNA2"]] = 6.0
    q[:, [idx["DNA1"], idx["DNA2"]]] = 1.0
    lpos[:, idx["Cisplatin"]] = 1.3
    q[:, idx["Cisplatin"]] = 1.0
    return {"freq": freq, "lpos": lpos, "q": q, "lneg": lneg}


def _il7_cytokine_shift(code: int, name: str, eff: dict) -> float:
    if code in (0, 1, 2) and name in ("IL-2", "TNFa", "IL-6"):
        return _IL7["cd4_cytokines_logit"] * eff["cd4_cytokines_logit"]
    if code in (3, 4) and name == "IFNg":
        return _IL7["cd8_ifng_logit"] * eff["cd8_ifng_logit"]
    if code in (6, 7) and name == "TNFa":
        return _IL7["nk_tnfa_logit"] * eff["nk_tnfa_logit"]
    if code == 5 and name == "IL-2":
        return _IL7["gd_il2_logit"] * eff["gd_il2_logit"]
    if code in (9, 10, 11) and name == "TNFa":
        return _IL7["mono_tnfa_logit"] * eff["mono_tnfa_logit"]
    return 0.0


# ---------------------------------------------------------------------------------------------
# Event generation
# ---------------------------------------------------------------------------------------------
def _cell_counts(lab: np.ndarray, prof: dict, rng: np.random.Generator) -> np.ndarray:
    """Expected counts (before drift and Poisson) of cells with leaf identities ``lab``."""
    n = lab.size
    on = rng.random((n, prof["q"].shape[1]), dtype=np.float32) < prof["q"][lab]
    level = np.where(on, prof["lpos"][lab], prof["lneg"][lab])
    noise = rng.standard_normal(level.shape, dtype=np.float32)
    level += noise * _noise_sd()  # per-cell noise (arcsinh)
    mu = COFACTOR * np.sinh(np.maximum(level, 0.0))
    mu *= np.exp(rng.normal(0.0, 0.15, size=(n, 1)))  # cell size / staining
    return mu


def _noise_sd() -> np.ndarray:
    """Per-channel SD of a cell's expression level around its population's (arcsinh)."""
    sd = np.full(len(_PANEL), 0.3)
    for i, (_, _, role) in enumerate(_PANEL):
        if role == "dna":
            sd[i] = 0.04  # DNA content varies per cell, shared by both channels (below)
    return sd


def _noncell_mu(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = _marker_index()
    n_m = len(_PANEL)
    level = rng.uniform(0.0, 0.4, size=(n, n_m))
    if kind == _BEAD:
        beads = [i for i, p in enumerate(_PANEL) if p[2] == "bead"]
        level[:, beads] = 6.6 + rng.normal(0.0, 0.25, size=(n, 1)) \
            + rng.normal(0.0, 0.08, size=(n, len(beads)))
        level[:, [idx["DNA1"], idx["DNA2"]]] = rng.uniform(0.0, 0.6, size=(n, 2))
        level[:, idx["Cisplatin"]] = rng.uniform(0.0, 1.0, size=n)
    else:  # debris: dim, low DNA, some cisplatin
        level += rng.uniform(0.0, 0.8, size=(n, n_m)) * (rng.random((n, n_m)) < 0.3)
        dna = rng.uniform(1.0, 3.2, size=n)
        level[:, idx["DNA1"]] = dna
        level[:, idx["DNA2"]] = dna + 0.6 + rng.normal(0.0, 0.1, size=n)
        level[:, idx["Cisplatin"]] = rng.uniform(0.5, 3.5, size=n)
    return COFACTOR * np.sinh(level)


def _event_block(lab: np.ndarray, prof: dict, drift: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Values of all mass channels (panel order) for one block of events."""
    idx = _marker_index()
    n, n_m = lab.size, len(_PANEL)
    leaf_p = prof["freq"]
    mu = np.zeros((n, n_m))
    is_leaf = lab < _N_LEAF
    if is_leaf.any():
        mu[is_leaf] = _cell_counts(lab[is_leaf], prof, rng)
    for kind in (_BEAD, _DEBRIS):
        sel = lab == kind
        if sel.any():
            mu[sel] = _noncell_mu(kind, int(sel.sum()), rng)
    sel = lab == _DEAD
    if sel.any():
        sur = rng.choice(_N_LEAF, size=int(sel.sum()), p=leaf_p)
        m = _cell_counts(sur, prof, rng) * 0.55
        m[:, idx["Cisplatin"]] = COFACTOR * np.sinh(rng.normal(5.2, 0.35, size=sur.size))
        m[:, [idx["DNA1"], idx["DNA2"]]] *= 0.8
        mu[sel] = m
    sel = lab == _DOUBLET
    if sel.any():
        k = int(sel.sum())
        mu[sel] = (_cell_counts(rng.choice(_N_LEAF, size=k, p=leaf_p), prof, rng)
                   + _cell_counts(rng.choice(_N_LEAF, size=k, p=leaf_p), prof, rng))
    # DNA: the two iridium isotopes measure the same DNA content.
    dna = [idx["DNA1"], idx["DNA2"]]
    mu[:, dna] *= np.exp(rng.normal(0.0, 0.15, size=(n, 1)))
    mu *= drift
    counts = rng.poisson(mu).astype(np.float64)
    # Extra zeros for dim signals (zero inflation), then CyTOF's uniform(0, 1) jitter on
    # non-zero counts. One uniform serves both: where it decides a zero-inflation coin
    # (u < p), the rest of its range, rescaled, is again uniform(0, 1).
    u = rng.random(mu.shape, dtype=np.float32)
    dim = mu < 3.0
    counts[dim & (u < _ZERO_INFLATION)] = 0.0
    jitter = np.where(dim, (u - _ZERO_INFLATION) / (1.0 - _ZERO_INFLATION), u)
    return np.where(counts > 0, counts - jitter, 0.0)


def _event_length(lab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = lab.size
    out = np.clip(np.rint(rng.normal(19.0, 3.5, n)), 10, 32)
    sel = lab == _DOUBLET
    out[sel] = np.clip(np.rint(rng.normal(37.0, 6.0, int(sel.sum()))), 24, 70)
    sel = lab == _DEBRIS
    out[sel] = np.clip(np.rint(rng.normal(11.0, 2.5, int(sel.sum()))), 6, 20)
    return out


def _sample_labels(n_events: int, freq: np.ndarray, noncell: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    noncell = np.minimum(noncell, 0.08)
    p = np.concatenate([freq * (1.0 - noncell.sum()), noncell])
    counts = rng.multinomial(n_events, p / p.sum())
    lab = np.repeat(np.arange(len(p), dtype=np.int8), counts)
    return lab[rng.permutation(n_events)]


def _simulate_sample(task: dict) -> dict:
    """Generate, write and summarise one sample; returns its per-population statistics."""
    rng = np.random.default_rng(task["seed_seq"])
    prof = _sample_profile(task["params"], task["timepoint"], task["condition"])
    n_events = max(100, int(round(task["cells"] * float(np.exp(rng.normal(0.0, 0.15))))))
    lab = _sample_labels(n_events, prof["freq"],
                         task["params"]["noncell"][task["timepoint"]], rng)
    order = _channel_order()
    time_col = order.index(next(i for i, p in enumerate(_PANEL) if p[2] == "time"))
    len_col = order.index(next(i for i, p in enumerate(_PANEL) if p[2] == "event_length"))
    mass_cols = [k for k, i in enumerate(order) if _PANEL[i][2] not in ("time", "event_length")]
    mass_src = [order[k] for k in mass_cols]
    events = np.empty((n_events, len(_PANEL)), dtype=np.float32)
    t0 = 0.0
    for start in range(0, n_events, _CHUNK):
        blk = lab[start:start + _CHUNK]
        vals = _event_block(blk, prof, task["drift"], rng)
        events[start:start + blk.size, mass_cols] = vals[:, mass_src]
        events[start:start + blk.size, len_col] = _event_length(blk, rng)
        times = t0 + np.cumsum(rng.exponential(1000.0 / 350.0, blk.size))  # ms, ~350 ev/s
        events[start:start + blk.size, time_col] = times
        t0 = float(times[-1])
        del vals
    pnn = [_PANEL[i][1] for i in order]
    pns = [_pns(*_PANEL[i]) for i in order]
    metadata = {**task["metadata"], f"$P{time_col + 1}R": str(int(np.ceil(t0)) + 1)}
    write_fcs(task["path"], events, pnn, pns, metadata=metadata)
    np.save(task["labels_path"], lab)
    markers = [_PANEL[i][0] for i in order]
    stats = _sample_stats(events, lab, markers)
    return {"sample_id": task["sample_id"], "n_events": n_events, "stats": stats}


def _sample_stats(events: np.ndarray, lab: np.ndarray, markers: list[str]) -> dict:
    """pct_live, pct_parent, median and frac_pos of every vocabulary population."""
    keep = [j for j, m in enumerate(markers) if _PANEL[_marker_index()[m]][2]
            in ("lineage", "functional")]
    counts = np.bincount(lab, minlength=len(POPULATIONS)).astype(float)
    n_live = counts[:_N_LEAF].sum()
    out: dict[str, dict] = {}
    for name, codes in _GROUPS.items():
        n = counts[list(codes)].sum()
        parent = counts[list(_PARENTS[name])].sum()
        entry = {
            "count": int(n),
            "pct_live": 100.0 * n / n_live if n_live else float("nan"),
            "pct_parent": 100.0 * n / parent if parent else float("nan"),
            "median": {}, "frac_pos": {},
        }
        sel = np.isin(lab, codes)
        if n:
            x = np.arcsinh(events[sel][:, keep].astype(np.float64) / COFACTOR)
            med = np.median(x, axis=0)
            pos = (x > FRAC_POS_THRESHOLD).mean(axis=0)
            for k, j in enumerate(keep):
                entry["median"][markers[j]] = float(med[k])
                entry["frac_pos"][markers[j]] = float(pos[k])
        out[name] = entry
    return out


# ---------------------------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------------------------
def _stat(stats: dict, term: dict, pid: str, timepoint: str) -> float:
    s = stats[(pid, timepoint, term["condition"])][term["population"]]
    if term["marker"] is None:
        return float(s[term["statistic"]])
    return float(s[term["statistic"]][term["marker"]])


def _driver_value(stats: dict, term: dict, pid: str) -> float:
    if term["timepoint"] == "baseline":
        return _stat(stats, term, pid, "baseline")
    # On the pipeline's scale: log2 ratio for frequencies, difference otherwise.
    return float(timepoint_change(_stat(stats, term, pid, "week6"), _stat(stats, term, pid, "baseline"),
                                  term["statistic"]))


def _standardise(values: np.ndarray, scope: np.ndarray, arm: str) -> tuple[float, float]:
    """Centre and scale of a driver: z-score over all patients for prognostic terms; for
    IL-7 terms centre 0 (no change, no benefit) and the root mean square over the IL-7 arm."""
    v = values[scope]
    if arm == "IL-7":
        return 0.0, float(np.sqrt(np.mean(v**2))) or 1.0
    return float(np.mean(v)), float(np.std(v)) or 1.0


def _expected_auroc(score: np.ndarray, p: np.ndarray) -> float:
    """Expected AUROC of ``score`` against outcomes drawn from probabilities ``p``."""
    w = p[:, None] * (1.0 - p[None, :])
    np.fill_diagonal(w, 0.0)
    gt = (score[:, None] > score[None, :]).astype(float)
    gt += 0.5 * (score[:, None] == score[None, :])
    np.fill_diagonal(gt, 0.0)
    return float((w * gt).sum() / w.sum())


def _auroc(score: np.ndarray, y: np.ndarray) -> float | None:
    pos, neg = score[y == 1], score[y == 0]
    if not pos.size or not neg.size:
        return None
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (pos.size * neg.size))


def _outcomes(stats: dict, pids: list[str], arms: np.ndarray,
              rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    n = len(pids)
    il7 = arms == "IL-7"
    scopes = {"all": np.ones(n, bool), "IL-7": il7}
    lp_sys = np.full(n, _OUTCOME["intercept"]) + _OUTCOME["treatment"] * il7
    drivers = []
    per_patient = {pid: {} for pid in pids}
    for t, term in enumerate(_DRIVERS):
        terms = [term] + ([term["with"]] if term["form"] == "interaction" else [])
        zs = []
        info = dict(term)
        for k, tm in enumerate(terms):
            v = np.array([_driver_value(stats, tm, pid) for pid in pids])
            centre, scale = _standardise(v, scopes[term["arm"]], term["arm"])
            zs.append((v - centre) / scale)
            key = "" if k == 0 else "with_"
            info[f"{key}centre"], info[f"{key}scale"] = centre, scale
            for i, pid in enumerate(pids):
                per_patient[pid][f"driver{t}{'_with' if k else ''}"] = float(v[i])
        z = zs[0]
        if term["form"] == "hinge":
            contrib = term["weight"] * np.maximum(0.0, z - term["knot"])
        elif term["form"] == "interaction":
            contrib = term["weight"] * zs[0] * zs[1]
        else:
            contrib = term["weight"] * z
        contrib = np.where(scopes[term["arm"]], contrib, 0.0)
        lp_sys += contrib
        info["id"] = f"driver{t}"
        drivers.append(info)
    lp = lp_sys + rng.normal(0.0, _OUTCOME["noise_sd"], n)
    p = _expit(lp)
    response = (rng.random(n) < p).astype(int)
    k = _OUTCOME["weibull_shape"]
    lam = np.log(2.0) / _OUTCOME["weibull_median_months"] ** k
    t_event = (rng.exponential(1.0, n) / (lam * np.exp(-_OUTCOME["hazard_lp_coef"] * lp))) ** (1 / k)
    t_cens = rng.uniform(*_OUTCOME["censor_months"], n)
    time = np.maximum(np.round(np.minimum(t_event, t_cens), 1), 0.1)
    event = (t_event <= t_cens).astype(int)
    age = np.clip(np.rint(rng.normal(69.0, 7.5, n)), 48, 90).astype(int)
    psa = np.round(np.exp(rng.normal(np.log(25.0), 1.0, n)), 1)
    clinical = pd.DataFrame({
        "patient_id": pids, "arm": arms, "response": response, "time": time, "event": event,
        "age": age, "psa_baseline": psa,
    })
    truth = {
        "drivers": drivers,
        "patients": [
            {"patient_id": pid, "arm": str(arms[i]), "lp_systematic": float(lp_sys[i]),
             "lp": float(lp[i]), "p": float(p[i]), "response": int(response[i]),
             "drivers": per_patient[pid]}
            for i, pid in enumerate(pids)
        ],
        "best_auroc": _expected_auroc(p, p),
        "best_auroc_systematic": _expected_auroc(lp_sys, p),
        "auroc_true_p_vs_response": _auroc(p, response),
        "response_rate": float(response.mean()),
    }
    return clinical, truth


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------
def _file_name(pid: str, timepoint: str, condition: str) -> str:
    tp = {"baseline": "W0", "week6": "W6"}[timepoint]
    cond = {"unstim": "Unstim", "stim": "PMAiono"}[condition]
    return f"IL7-{pid}_{tp}_{cond}_01.fcs"


def _metadata(pid: str, batch: int, timepoint: str, condition: str, file: str) -> dict:
    day = 3 + 7 * batch + (0 if timepoint == "baseline" else 42)
    date = (np.datetime64("2019-03-01") + np.timedelta64(day, "D")).astype(object)
    return {
        "$CYT": "Helios", "$CYTSN": "H-0217", "$FIL": file, "$SRC": f"{pid} {timepoint}",
        "$DATE": date.strftime("%d-%b-%Y").upper(), "$BTIM": "10:15:00", "$ETIM": "10:42:00",
        "$OP": "simulated", "$PROJ": "IL7 after sipuleucel-T",
        "CONDITION": condition, "TIMEPOINT": timepoint, "BATCH": f"B{batch + 1}",
    }


def _run_tasks(tasks: list[dict], n_jobs: int) -> list[dict]:
    if n_jobs == 1 or len(tasks) < 2:
        return [_simulate_sample(t) for t in tasks]
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(n_jobs, len(tasks)), mp_context=ctx) as pool:
        return list(pool.map(_simulate_sample, tasks, chunksize=max(1, len(tasks) // (4 * n_jobs))))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        return float(obj) if np.isfinite(obj) else None
    return obj


def simulate_cohort(
    out: str | os.PathLike,
    *,
    n_patients: int = 60,
    seed: int = 0,
    cells_per_sample: int = 4000,
    n_batches: int = 2,
    id_prefix: str = "P",
    overwrite: bool = False,
    n_jobs: int = 1,
) -> SimulatedCohort:
    """Write a synthetic IL-7 trial cohort (FCS files, tables, ground truth) into ``out``.

    Parameters
    ----------
    out : str or PathLike
        Output folder; must be new or empty unless ``overwrite``.
    n_patients : int, default 60
        Patients, half in each arm (>= 4).
    seed : int, default 0
        Seed of everything; the same seed gives byte-identical files.
    cells_per_sample : int, default 4000
        Mean events per FCS file (each file varies around it, roughly ±30%).
    n_batches : int, default 2
        Acquisition batches; each patient's four files share a batch and its intensity drift.
    id_prefix : str, default "P"
        Prefix of patient ids (``P001``...).
    overwrite : bool, default False
        Replace a non-empty ``out`` folder.
    n_jobs : int, default 1
        Processes generating samples in parallel (-1: all cores). Does not change results.

    Returns
    -------
    SimulatedCohort
        Paths of the folder and of ``samples.csv``, ``clinical.csv``, ``panel.csv`` and
        ``truth.json``. FCS files are in ``fcs/``, true event identities in
        ``labels/<sample_id>.npy`` (int8, same order as the events).

    Raises
    ------
    ConfigError
        A parameter is invalid.
    OutputExistsError
        ``out`` is not empty and ``overwrite`` is False.
    """
    out, n_jobs = _validate(out, n_patients, seed, cells_per_sample, n_batches, id_prefix,
                            overwrite, n_jobs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_cohort(tmp, n_patients=n_patients, seed=seed, cells_per_sample=cells_per_sample,
                      n_batches=n_batches, id_prefix=id_prefix, n_jobs=n_jobs)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SimulatedCohort(root=out, samples=out / "samples.csv", clinical=out / "clinical.csv",
                           panel=out / "panel.csv", truth=out / "truth.json")


def _replace_dir(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, trash / "old")
    os.replace(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


def _write_cohort(root: Path, *, n_patients: int, seed: int, cells_per_sample: int,
                  n_batches: int, id_prefix: str, n_jobs: int) -> None:
    (root / "fcs").mkdir()
    (root / "labels").mkdir()
    cohort_ss, patients_ss, outcome_ss = np.random.SeedSequence(seed).spawn(3)
    design = _design(n_patients, n_batches, np.random.default_rng(cohort_ss))
    pids = _patient_ids(n_patients, id_prefix)
    tasks, rows, params_all = [], [], {}
    for i, (pid, pss) in enumerate(zip(pids, patients_ss.spawn(n_patients), strict=True)):
        param_ss, *sample_ss = pss.spawn(5)
        params = _patient_params(np.random.default_rng(param_ss), str(design["arms"][i]))
        params_all[pid] = params
        batch = int(design["batches"][i])
        k = 0
        for tp in TIMEPOINTS:
            for cond in CONDITIONS:
                file = _file_name(pid, tp, cond)
                sid = f"{pid}_{tp}_{cond}"
                rows.append({"sample_id": sid, "patient_id": pid, "file": f"fcs/{file}",
                             "timepoint": tp, "condition": cond, "batch": f"B{batch + 1}"})
                tasks.append({
                    "seed_seq": sample_ss[k], "params": params, "timepoint": tp,
                    "condition": cond, "cells": cells_per_sample,
                    "drift": design["drift"][batch], "path": root / "fcs" / file,
                    "labels_path": root / "labels" / f"{sid}.npy", "sample_id": sid,
                    "metadata": _metadata(pid, batch, tp, cond, file),
                })
                k += 1
    results = _run_tasks(tasks, n_jobs)
    stats = {}
    n_events = {}
    for task, res in zip(tasks, results, strict=True):
        pid = task["sample_id"].rsplit("_", 2)[0]
        stats[(pid, task["timepoint"], task["condition"])] = res["stats"]
        n_events[res["sample_id"]] = res["n_events"]
    clinical, outcome_truth = _outcomes(stats, pids, design["arms"],
                                        np.random.default_rng(outcome_ss))
    pd.DataFrame(rows).to_csv(root / "samples.csv", index=False)
    clinical.to_csv(root / "clinical.csv", index=False)
    _panel_frame().to_csv(root / "panel.csv", index=False)
    truth = _truth(seed=seed, n_patients=n_patients, cells_per_sample=cells_per_sample,
                   n_batches=n_batches, design=design, pids=pids, params=params_all,
                   n_events=n_events, outcome=outcome_truth)
    (root / "truth.json").write_text(json.dumps(_jsonable(truth), indent=1) + "\n")


def _profile_parameters() -> dict:
    """Marker profiles of the cell subsets, by name (levels on the arcsinh(x/5) scale)."""
    name = {c: n for c, n, _ in POPULATIONS}
    return {
        "negative_level": _NEG,
        "cell_profiles": {name[c]: {m: list(v) if isinstance(v, tuple) else v
                                    for m, v in prof.items()} for c, prof in _PROFILES.items()},
        "constitutive_level_fraction_pos": {name[c]: {m: list(v) for m, v in prof.items()}
                                            for c, prof in _CONSTITUTIVE.items()},
        "cytokine_level": _CYTOKINE_LEVEL,
        "stim_fraction_pos": {name[c]: prof for c, prof in _STIM.items()},
        "unstim_fraction_pos": _UNSTIM_CYTOKINE,
        "unstim_fraction_pos_monocytes": _MONO_UNSTIM,
    }


def _truth(*, seed, n_patients, cells_per_sample, n_batches, design, pids, params, n_events,
           outcome) -> dict:
    patients = []
    for i, entry in enumerate(outcome["patients"]):
        pr = params[entry["patient_id"]]
        patients.append({
            **entry, "batch": f"B{int(design['batches'][i]) + 1}",
            "il7_responsiveness": pr["r"], "il7_effects": pr["effects"],
            "suppression": pr["suppression"],
        })
    return {
        "description": "Synthetic IL-7 after sipuleucel-T cohort; see predictor.simulate.",
        "parameters": {
            "seed": seed, "n_patients": n_patients, "cells_per_sample": cells_per_sample,
            "n_batches": n_batches, "cofactor": COFACTOR,
            "timepoints": list(TIMEPOINTS), "conditions": list(CONDITIONS),
            "base_frequency_pct_live": dict(zip([p[1] for p in POPULATIONS[:_N_LEAF]],
                                                _BASE_FREQ, strict=True)),
            "noncell_fraction": dict(zip(["bead", "debris", "dead", "doublet"],
                                         _NONCELL_FRAC, strict=True)),
            "il7_effects": _IL7, "suppression": _SUPPRESSION, "outcome": _OUTCOME,
            **_profile_parameters(),
            "batch_drift": {f"B{b + 1}": dict(zip([p[1] for p in _PANEL],
                                                   design["drift"][b], strict=True))
                            for b in range(n_batches)},
        },
        "frac_pos_threshold": FRAC_POS_THRESHOLD,
        "statistics": {
            "scale": "arcsinh(x / 5) of the written float32 values",
            "pct_live": "% of live singlet cells (codes 0-13)",
            "pct_parent": "% of parent population",
            "parents": _PARENT_NAMES,
            "groups": {k: list(v) for k, v in _GROUPS.items()},
        },
        "populations": [{"code": c, "name": n, "major": m} for c, n, m in POPULATIONS],
        "linear_predictor": (
            "lp = intercept + treatment*[IL-7] + sum(weight * f(z)) over drivers in scope "
            "(arm 'IL-7' terms only for IL-7 patients) + N(0, noise_sd^2); z = (value - centre)"
            " / scale (prognostic: mean and SD over all patients; IL-7 terms: centre 0 and root"
            " mean square over the IL-7 arm); f: linear z, hinge max(0, z - knot),"
            " interaction z * z_with"
        ),
        "drivers": outcome["drivers"],
        "best_auroc": outcome["best_auroc"],
        "best_auroc_systematic": outcome["best_auroc_systematic"],
        "auroc_true_p_vs_response": outcome["auroc_true_p_vs_response"],
        "response_rate": outcome["response_rate"],
        "n_events": n_events,
        "patients": patients,
    }
