"""Panels: which channel carries which marker, its role and its arcsinh cofactor."""

from __future__ import annotations

import difflib
import os
import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from predictor.errors import PanelError
from predictor.io.fcs import FCSData, FCSHeader, channel_major, read_channels, read_fcs_header

__all__ = [
    "ROLES",
    "Panel",
    "read_panel",
    "panel_from_frame",
    "draft_panel",
    "parse_channel",
    "normalize_marker",
    "apply_panel",
    "read_panel_events",
]

ROLES = (
    "lineage", "functional", "dna", "viability", "bead", "time", "event_length",
    "barcode", "exclude",
)
_GREEK = {"α": "a", "β": "b", "γ": "g", "δ": "d", "κ": "k", "λ": "l"}

# Column and role names of other tools' panel files (CATALYST: fcs_colname, antigen,
# marker_class with type/state/none).
_COLUMN_ALIASES = {
    "channel": ("fcs_colname", "pnn", "channel_name", "metal", "fcs_channel", "channels"),
    "marker": ("antigen", "pns", "desc", "description", "marker_name", "markers", "target"),
    "role": ("marker_class", "class", "type", "usage"),
}
_ROLE_ALIASES = {
    "type": "lineage", "state": "functional", "none": "exclude", "ignore": "exclude",
    "functional_marker": "functional", "lineage_marker": "lineage", "live": "viability",
    "beads": "bead", "eventlength": "event_length", "event length": "event_length",
    "cell_length": "event_length", "barcodes": "barcode",
}


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
        return [m for _, m, role, _ in self.rows if role in roles]

    def cofactors(self) -> dict[str, float]:
        return {m: cof for _, m, _, cof in self.rows}

    def roles(self) -> dict[str, str]:
        """Marker → role."""
        return {m: role for _, m, role, _ in self.rows}

    @cached_property
    def rows(self) -> tuple[tuple[str, str, str, float], ...]:
        """(channel, marker, role, cofactor) of every row, as plain Python values, taken
        from the table once: iterating the table's string columns costs ~0.1 ms each time,
        and every sample's cleanup and gating asks for these."""
        t = self.table
        return tuple(zip(t["channel"].tolist(), t["marker"].tolist(), t["role"].tolist(),
                         t["cofactor"].astype(float).tolist(), strict=True))

    def to_csv(self, path: str | os.PathLike) -> None:
        self.table.to_csv(path, index=False)


# ------------------------------------------------------------------------------ reading


def read_panel(path: str | os.PathLike, *, default_cofactor: float = 5.0) -> Panel:
    """Read and validate a panel CSV.

    Parameters
    ----------
    path
        CSV with columns ``channel, marker, role`` and optionally ``cofactor``, in any order;
        other columns are ignored. CATALYST panels (``fcs_colname, antigen, marker_class``
        with ``type/state/none``) are understood too.
    default_cofactor
        Cofactor of the rows that give none.

    Returns
    -------
    Panel

    Raises
    ------
    PanelError
        Naming the file, row and column at fault and how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise PanelError(f"{path}: panel file not found. Draft one with `predictor panel FILE.fcs`.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as exc:
        raise PanelError(f"{path}: not a readable CSV ({exc}).") from None
    return panel_from_frame(df, source=str(path), default_cofactor=default_cofactor)


def panel_from_frame(
    df: pd.DataFrame, *, source: str = "<panel>", default_cofactor: float = 5.0
) -> Panel:
    """Validate a panel table (as read from a CSV, all strings or numbers) into a :class:`Panel`.

    Parameters
    ----------
    df
        Columns ``channel, marker, role`` and optionally ``cofactor``; any order, extra
        columns ignored.
    source
        Name used in error messages (the file the table came from).
    default_cofactor
        Cofactor of the rows that give none.
    """
    df = df.copy()
    df.columns = [str(c).strip().lower().replace(" ", "_") for c in df.columns]
    df = _resolve_columns(df, source)
    for col in ("channel", "marker", "role"):
        df[col] = df[col].astype(str).str.strip().replace({"nan": ""})
    df = df.reset_index(drop=True)
    df["role"] = [_role(r, source, i) for i, r in enumerate(df["role"].str.lower())]
    empty = df.index[df["channel"] == ""]
    if len(empty):
        raise PanelError(
            f"{source}, row {int(empty[0]) + 2}, column 'channel': empty. Give the channel name "
            "($PnN) as in the FCS file, or delete the row."
        )
    df.loc[df["marker"] == "", "marker"] = df["channel"]
    dup = df["channel"][df["channel"].duplicated()].tolist()
    if dup:
        raise PanelError(f"{source}: channel(s) listed twice: {', '.join(dup)}. Keep one row each.")
    dupm = df["marker"][df["marker"].duplicated()].tolist()
    if dupm:
        raise PanelError(
            f"{source}: marker(s) listed twice: {', '.join(dupm)}. Give each a unique name."
        )
    if "cofactor" not in df.columns:
        df["cofactor"] = ""
    raw = df["cofactor"].astype(str).str.strip().replace({"nan": ""})
    cof = pd.to_numeric(raw.replace("", np.nan), errors="coerce")
    bad = df.index[(raw != "") & (cof.isna() | ~(cof > 0) | ~np.isfinite(cof))]
    if len(bad):
        i = int(bad[0])
        raise PanelError(
            f"{source}, row {i + 2}, column 'cofactor': must be a number > 0 (5 for CyTOF, 150 "
            f"for flow). Got {raw[i]!r} instead."
        )
    df["cofactor"] = cof.fillna(default_cofactor).astype(float)
    table = df[["channel", "marker", "role", "cofactor"]].reset_index(drop=True)
    return Panel(table, source)


def _resolve_columns(df: pd.DataFrame, source: str) -> pd.DataFrame:
    for col, aliases in _COLUMN_ALIASES.items():
        if col in df.columns:
            continue
        alias = next((a for a in aliases if a in df.columns), None)
        if alias is not None:
            df = df.rename(columns={alias: col})
    missing = [c for c in ("channel", "marker", "role") if c not in df.columns]
    if missing:
        hints = []
        for c in missing:
            close = difflib.get_close_matches(c, list(df.columns), n=1, cutoff=0.6)
            if close:
                hints.append(f"rename '{close[0]}' to '{c}'")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise PanelError(
            f"{source}: missing column(s) {', '.join(missing)}{hint}; a panel needs channel, "
            "marker, role (and optionally cofactor). Draft one with `predictor panel FILE.fcs`."
        )
    return df


def _role(value: str, source: str, i: int) -> str:
    value = _ROLE_ALIASES.get(value, value)
    if value in ROLES:
        return value
    close = difflib.get_close_matches(value, ROLES, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise PanelError(
        f"{source}, row {i + 2}, column 'role': {value!r} is not one of "
        f"{', '.join(ROLES)}.{hint}"
    )


# ------------------------------------------------------------------------------ drafting

_METAL = r"(?:[A-Z][a-z]?)"
_RE_CYTOBANK = re.compile(r"^(?P<name>.*?)\((?P<inner>[^()]*)\)\s*(?:Di|Dd)?$")
_RE_METAL_MASS = re.compile(rf"^(?P<el>{_METAL})(?P<mass>\d{{2,3}})(?:Di|Dd)?$")
_RE_MASS_METAL = re.compile(rf"^(?P<mass>\d{{2,3}})(?P<el>{_METAL})(?:Di|Dd)?$")
_RE_PREFIX = re.compile(rf"^(?:\d{{2,3}}{_METAL}|{_METAL}\d{{2,3}})(?:Di|Dd)?[\s_\-.:]+")
_RE_SUFFIX = re.compile(rf"[\s_\-.:]+\(?(?:\d{{2,3}}{_METAL}|{_METAL}\d{{2,3}})(?:Di|Dd)?\)?$")
_ELEMENTS = {
    "Y", "In", "La", "Ce", "Pr", "Nd", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb",
    "Lu", "Ir", "Pt", "Pd", "Rh", "Cd", "Bi", "Ba", "Cs", "Xe", "I", "Sn", "Os", "Au", "Hg",
    "Pb", "Ru", "Ag", "Ti", "Cu", "Zn", "Ta", "Hf", "W", "Re", "Te", "Sr", "Rb", "Kr",
}
_BEAD_METALS = {("Ce", 140), ("Eu", 151), ("Eu", 153), ("Ho", 165), ("Lu", 175)}
_DNA_METALS = {("Ir", 191), ("Ir", 193)}
_VIABILITY_METALS = {("Pt", 194), ("Pt", 195), ("Pt", 196), ("Pt", 198), ("Rh", 103)}
_BARCODE_METALS = {("Pd", m) for m in range(102, 111)}
_FUNCTIONAL = {
    "il1b", "il2", "il3", "il4", "il5", "il6", "il7", "il8", "il10", "il12", "il13", "il15",
    "il17", "il17a", "il17f", "il21", "il22", "il23", "ifng", "ifna", "ifna2", "tnfa", "tnf",
    "ltb", "mip1a", "mip1b", "ccl3", "ccl4", "ccl5", "rantes", "gmcsf", "gcsf", "tgfb",
    "tgfb1", "mcp1", "ip10", "gzma", "gzmb", "gzmk", "granzymea", "granzymeb", "granzymek",
    "perforin", "prf1", "ki67", "mki67", "cd107a", "lamp1", "cd154", "cd40l", "ikba",
    "ccasp3", "cleavedcaspase3", "caspase3", "cparp", "bcl2", "mcl1", "idu", "brdu",
    # activation and checkpoint molecules: read as cell states
    "pd1", "ctla4", "lag3", "tim3", "tigit", "cd69", "icos", "ox40", "41bb", "cd137",
}
_LINEAGE = {
    "hladr", "hlaabc", "tcrgd", "tcrab", "tcrvd2", "tcrvg9", "vd2", "vg9", "va72", "tcrva72",
    "igm", "igd", "igg", "iga", "ige", "igk", "igl", "kappa", "lambda", "ccr2", "ccr4", "ccr5",
    "ccr6", "ccr7", "ccr9", "ccr10", "cxcr3", "cxcr4", "cxcr5", "cx3cr1", "foxp3", "tbet",
    "eomes", "gata3", "rorgt", "helios", "tcf1", "tox", "nkg2a", "nkg2c", "nkg2d", "nkp30",
    "nkp44", "nkp46", "kir2dl1", "kir2dl3", "kir3dl1", "pdl1", "pdl2",
    "cd45ra", "cd45ro", "klrg1", "fcer1a", "bdca1", "bdca2", "bdca3", "cd1c",
    "siglec8", "crth2", "cd11a", "cd11b", "cd11c", "gitr", "btla",
    "cd26", "cd28", "cd38", "cd39", "cd57", "cd73", "cd95", "cd161", "slamf7",
    "ilt3", "mhcii", "tcr", "bcr", "cd3e", "cd8a", "cd8b",
}
_GAUSSIAN = {"center", "offset", "width", "residual", "beaddist", "bead_dist", "event#", "eventno"}


def parse_channel(pnn: str) -> tuple[str, tuple[str, int] | None]:
    """Split a channel name into its label and its metal.

    ``'CD3(110:114)Dd'`` gives ``('CD3', ('Cd', 110))``, ``'pNFkB(Nd142)Dd'`` gives
    ``('pNFkB', ('Nd', 142))``, ``'Nd142Di'`` gives ``('', ('Nd', 142))`` and ``'142Nd_CD19'``
    gives ``('CD19', ('Nd', 142))``.
    """
    name = str(pnn).strip()
    metal = _metal_of(name)
    m = _RE_CYTOBANK.match(name)
    if m:
        inner = m.group("inner")
        metal = _metal_of(inner) or metal
        if metal is None and re.fullmatch(r"\d{2,3}(?::\d{2,3})?", inner):
            metal = ("Cd", int(inner.split(":")[0])) if 106 <= int(inner[:3]) <= 116 else None
        return _strip_decorations(m.group("name")), metal
    if _RE_METAL_MASS.match(name) or _RE_MASS_METAL.match(name):
        return "", metal
    return _strip_decorations(name), metal


def _metal_of(text: str) -> tuple[str, int] | None:
    for rx in (rf"({_METAL})(\d{{2,3}})", rf"(\d{{2,3}})({_METAL})"):
        for m in re.finditer(rx, text):
            a, b = m.groups()
            el, mass = (a, b) if a[0].isalpha() else (b, a)
            if el in _ELEMENTS and 75 <= int(mass) <= 209:
                return el, int(mass)
    return None


def _strip_decorations(label: str) -> str:
    """``142Nd_CD19`` → ``CD19``, ``CD19_Nd142Di`` → ``CD19``, ``Nd142Di`` → ''."""
    label = label.strip()
    prev = None
    while prev != label:
        prev = label
        for rx in (_RE_PREFIX, _RE_SUFFIX):
            m = rx.search(label)
            if m and _metal_of(m.group(0)) is not None:
                label = (label[: m.start()] + label[m.end() :]).strip()
    if _RE_METAL_MASS.match(label) or _RE_MASS_METAL.match(label):
        return "" if _metal_of(label) else label
    return label.strip(" _-")


def _guess_role(marker: str, metal: tuple[str, int] | None, channel: str) -> str:
    key = normalize_marker(marker)
    chan_key = normalize_marker(channel)
    if key == "time" or chan_key == "time":
        return "time"
    if key in ("eventlength", "celllength") or chan_key in ("eventlength", "celllength"):
        return "event_length"
    if chan_key in _GAUSSIAN or key in _GAUSSIAN:
        return "exclude"
    if key.startswith("dna") or key in ("ir191", "ir193", "iridium", "intercalator") or (
        not key and metal in _DNA_METALS
    ):
        return "dna"
    if any(w in key for w in ("cisplatin", "viability", "livedead", "cispt")) or key in (
        "live", "dead", "rh103", "pt195", "pt194", "pt196", "cis", "cell_id", "103rh"
    ) or (not key and metal in _VIABILITY_METALS):
        return "viability"
    if "bead" in key or (not key and metal in _BEAD_METALS):
        return "bead"
    if re.fullmatch(r"bc\d+", key) or "barcode" in key or (not key and metal in _BARCODE_METALS):
        return "barcode"
    if not key:
        return "exclude"
    if (
        key in _FUNCTIONAL
        or re.match(r"^(?:p[A-Z0-9]|pp\d|phospho)", marker)
        or re.fullmatch(r"il\d+[a-z]?", key)
    ):
        return "functional"
    if key in _LINEAGE or re.fullmatch(r"cd\d+[a-z]*(?:ra|ro)?", key) or key.startswith("hla"):
        return "lineage"
    return "exclude"


def draft_panel(sample: FCSData | FCSHeader, *, cofactor: float = 5.0) -> Panel:
    """Draft a panel from a file's channel names, for the user to check and edit.

    The marker comes from ``$PnS`` when it names one (decorations such as ``142Nd_CD19``
    removed), else from ``$PnN`` (``CD3(110:114)Dd`` → ``CD3``). Roles are guessed: DNA
    (Ir191/193), viability (cisplatin, Pt194–198, Rh103), beads (Ce140, Eu151/153, Ho165,
    Lu175 without a marker), barcodes (``BC1``…, unnamed Pd102–110), time, event length,
    functional markers (cytokines, granzymes, perforin, Ki-67, phospho-proteins ``pS6``…),
    lineage markers (``CD…``, HLA-DR, TCRγδ, IgM…); anything unrecognised is ``exclude``.

    Parameters
    ----------
    sample
        A file read with :func:`~predictor.io.fcs.read_fcs` (or only its header).
    cofactor
        Arcsinh cofactor of every channel (5 for CyTOF).

    Returns
    -------
    Panel
    """
    rows = []
    for pnn, pns in zip(sample.pnn, sample.pns, strict=True):
        label, metal = parse_channel(pnn)
        from_pns = parse_channel(pns)[0] if pns and pns.strip() != pnn.strip() else ""
        marker = from_pns or label
        rows.append({"channel": pnn, "marker": marker, "role": _guess_role(marker, metal, pnn)})
    table = pd.DataFrame(rows, columns=["channel", "marker", "role"])
    table.loc[table["marker"] == "", "marker"] = table["channel"]
    dup = table["marker"].duplicated(keep=False)
    table.loc[dup, "marker"] = table.loc[dup, "marker"] + " (" + table.loc[dup, "channel"] + ")"
    table["cofactor"] = float(cofactor)
    return panel_from_frame(table, source=f"panel drafted from {sample.path}")


# ------------------------------------------------------------------------------ applying


def apply_panel(sample: FCSData, panel: Panel, *, roles: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Events of ``sample`` as a float32 frame with one column per panel marker.

    Columns are matched by channel name (``$PnN``), whatever their order in the file; when no
    channel has the exact name, a unique match ignoring case and surrounding spaces is used.
    Channels with role ``exclude`` are left out.

    Raises
    ------
    PanelError
        Naming the file and the markers whose channels it lacks.
    """
    cols, markers = _panel_columns(sample.pnn, panel, sample.path, roles)
    data = channel_major(sample.events, cols)
    # data.T is a view: the frame's block is ``data`` itself, so each column is contiguous.
    return pd.DataFrame(data.T, columns=markers, copy=False)


def read_panel_events(path: str | os.PathLike, panel: Panel) -> tuple[pd.DataFrame, list[str]]:
    """Every event of one FCS file as :func:`apply_panel` gives them, and the file's quirks.

    The same frame as ``apply_panel(read_fcs(path), panel)``, read straight into its
    channel-major block (:func:`~predictor.io.fcs.read_channels`).
    """
    header = read_fcs_header(path)
    cols, markers = _panel_columns(header.pnn, panel, header.path, None)
    data = read_channels(header, cols)
    return pd.DataFrame(data.T, columns=markers, copy=False), list(header.quirks)


def _panel_columns(pnn: list[str], panel: Panel, path: object,
                   roles: tuple[str, ...] | None) -> tuple[list[int], list[str]]:
    """The file's channel index and the marker of every panel row used (see apply_panel)."""
    used = [(c, m) for c, m, role, _ in panel.rows
            if role != "exclude" and (roles is None or role in roles)]
    index = {name: i for i, name in enumerate(pnn)}
    loose: dict[str, list[int]] = {}
    for i, name in enumerate(pnn):
        loose.setdefault(name.strip().lower(), []).append(i)
    cols, missing = [], []
    for c, m in used:
        if c in index:
            cols.append(index[c])
        elif len(loose.get(c.strip().lower(), [])) == 1:
            cols.append(loose[c.strip().lower()][0])
        else:
            missing.append(f"{m} ({c})")
    if missing:
        raise PanelError(
            f"{path}: lacks the panel channel(s) {', '.join(missing)}. Fix the panel "
            f"({panel.source}) or drop the file from the sample sheet."
        )
    return cols, [m for _, m in used]
