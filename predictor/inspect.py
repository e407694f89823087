"""What FCS files hold, without reading their events: the data behind ``predictor inspect``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from predictor.errors import FCSError
from predictor.io.fcs import read_fcs_header

__all__ = ["FileReport", "inspect_files", "format_report"]


@dataclass(frozen=True)
class FileReport:
    """Summary of one FCS file.

    Attributes
    ----------
    path : Path
    ok : bool
        False when the file cannot be read; ``error`` says why.
    version : str
    n_events, n_channels : int
    channels : list[tuple[str, str]]
        ``($PnN, $PnS)`` per channel, in file order.
    quirks : list[str]
        Departures from the standard that reading works around.
    error : str
        One-line reason when ``ok`` is False, else ''.
    """

    path: Path
    ok: bool
    version: str = ""
    n_events: int = 0
    n_channels: int = 0
    channels: list[tuple[str, str]] = field(default_factory=list)
    quirks: list[str] = field(default_factory=list)
    error: str = ""


def inspect_files(paths: Iterable[str | os.PathLike]) -> list[FileReport]:
    """Report version, events, channels and quirks of each file; a bad file does not stop the rest.

    Only the HEADER and TEXT segments are read, and checked against each file's size, so even
    large files are inspected in milliseconds.

    Parameters
    ----------
    paths
        FCS files.

    Returns
    -------
    list[FileReport]
        One per path, in order; unreadable files have ``ok=False`` and a one-line ``error``.
    """
    reports = []
    for p in paths:
        path = Path(p)
        try:
            h = read_fcs_header(path)
        except FCSError as exc:
            reports.append(FileReport(path=path, ok=False, error=" ".join(str(exc).split())))
            continue
        reports.append(FileReport(
            path=path, ok=True, version=h.version, n_events=h.n_events, n_channels=h.n_channels,
            channels=list(zip(h.pnn, h.pns, strict=True)), quirks=list(h.quirks),
        ))
    return reports


def format_report(report: FileReport | Sequence[FileReport]) -> str:
    """Plain-text rendering of one report (or several, separated by blank lines).

    Parameters
    ----------
    report
        From :func:`inspect_files`.

    Returns
    -------
    str
        No trailing newline.
    """
    if not isinstance(report, FileReport):
        return "\n\n".join(format_report(r) for r in report)
    if not report.ok:
        return f"{report.path}\n  ERROR: {report.error}"
    lines = [
        f"{report.path}",
        f"  FCS {report.version}, {report.n_events:,} events, {report.n_channels} channels",
    ]
    if report.quirks:
        lines.append("  quirks:")
        lines += [f"    - {q}" for q in report.quirks]
    width = max((len(pnn) for pnn, _ in report.channels), default=0)
    lines.append("  channels:")
    for i, (pnn, pns) in enumerate(report.channels, start=1):
        lines.append(f"    {i:>3}  {pnn:<{width}}  {pns}".rstrip())
    return "\n".join(lines)
