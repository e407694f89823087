"""Panels: which channel carries which marker, its role and its arcsinh cofactor."""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from predictor.errors import PanelError
from predictor.io.fcs import FCSData

__all__ = ["ROLES", "Panel", "read_panel", "normalize_marker", "apply_panel"]

ROLES = (
    "lineage", "functional", "dna", "viability", "bead", "time", "event_length",
    "barcode", "exclude",
)
_GREEK = {"α": "a", "β": "b", "γ": "g", "δ": "d", "κ": "k", "λ": "l"}


def normalize_marker(name: str) -> str:
    """Key for matching marker names: case, punctuation and Greek letters ignored.

    ``IFNγ``, ``IFNg``, ``IFN-gamma`` all map to ``ifng``; ``HLA-DR`` and ``HLADR`` agree.
    """
    s = unicodedata.normalize("NFKC", str(name)).strip()
    s = "".join(_GREEK.get(ch, ch) for ch in s)
    s = s.lower().replace("gamma", "g").replace("alpha", "a").replace("beta", "b")
    s = s.replace("delta", "d")
    return re.sub(r"[^0-9a-z+]", "", s)


@dataclass(frozen=True)
class Panel:
    """A validated panel table with columns ``channel, marker, role, cofactor``."""

    table: pd.DataFrame
    source: str = "<panel>"

    @property
    def channels(self) -> list[str]:
        return list(self.table["channel"])

    @property
    def markers(self) -> list[str]:
        return list(self.table["marker"])

    def by_role(self, *roles: str) -> list[str]:
        """Markers whose role is one of ``roles``, in panel order."""
        return list(self.table.loc[self.table["role"].isin(roles), "marker"])

    def cofactors(self) -> dict[str, float]:
        return dict(zip(self.table["marker"], self.table["cofactor"].astype(float), strict=True))

    def to_csv(self, path: str | os.PathLike) -> None:
        self.table.to_csv(path, index=False)


def read_panel(path: str | os.PathLike, *, default_cofactor: float = 5.0) -> Panel:
    """Read and validate a panel CSV (``channel, marker, role`` and optional ``cofactor``)."""
    path = Path(path)
    if not path.is_file():
        raise PanelError(f"{path}: panel file not found. Draft one with `predictor panel FILE.fcs`.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise PanelError(f"{path}: not a readable CSV ({exc}).") from None
    df.columns = [c.strip().lower() for c in df.columns]
    missing = [c for c in ("channel", "marker", "role") if c not in df.columns]
    if missing:
        raise PanelError(
            f"{path}: missing column(s) {', '.join(missing)}; a panel needs channel, marker, role "
            "(and optionally cofactor)."
        )
    for col in ("channel", "marker", "role"):
        df[col] = df[col].str.strip()
    df["role"] = df["role"].str.lower()
    for i, row in df.iterrows():
        line = int(i) + 2
        if not row["channel"]:
            raise PanelError(f"{path}, row {line}: empty 'channel'.")
        if row["role"] not in ROLES:
            raise PanelError(
                f"{path}, row {line}, column 'role': {row['role']!r} is not one of "
                f"{', '.join(ROLES)}."
            )
        if not row["marker"]:
            df.loc[i, "marker"] = row["channel"]
    dup = df["channel"][df["channel"].duplicated()].tolist()
    if dup:
        raise PanelError(f"{path}: channel(s) listed twice: {', '.join(dup)}.")
    dupm = df["marker"][df["marker"].duplicated()].tolist()
    if dupm:
        raise PanelError(f"{path}: marker(s) listed twice: {', '.join(dupm)}. Give each a unique name.")
    if "cofactor" not in df.columns:
        df["cofactor"] = ""
    cof = pd.to_numeric(df["cofactor"].replace("", np.nan), errors="coerce")
    bad = df.index[(df["cofactor"] != "") & (cof.isna() | (cof <= 0))]
    if len(bad):
        i = int(bad[0])
        raise PanelError(
            f"{path}, row {i + 2}, column 'cofactor': must be a number > 0. Got "
            f"{df.loc[i, 'cofactor']!r} instead."
        )
    df["cofactor"] = cof.fillna(default_cofactor).astype(float)
    return Panel(df[["channel", "marker", "role", "cofactor"]].reset_index(drop=True), str(path))


def apply_panel(sample: FCSData, panel: Panel, *, roles: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Events of ``sample`` as a float32 frame with one column per panel marker.

    Columns are matched by channel name (``$PnN``), whatever their order in the file. Raises
    :class:`PanelError` naming the file and the markers whose channels it lacks.
    """
    table = panel.table if roles is None else panel.table[panel.table["role"].isin(roles)]
    table = table[table["role"] != "exclude"]
    index = {name: i for i, name in enumerate(sample.pnn)}
    missing = [f"{m} ({c})" for c, m in zip(table["channel"], table["marker"], strict=True) if c not in index]
    if missing:
        raise PanelError(
            f"{sample.path}: lacks the panel channel(s) {', '.join(missing)}. Fix the panel "
            f"({panel.source}) or drop the file from the sample sheet."
        )
    cols = [index[c] for c in table["channel"]]
    data = np.ascontiguousarray(sample.events[:, cols], dtype=np.float32)
    return pd.DataFrame(data, columns=list(table["marker"]), copy=False)
