"""Read and write FCS files (first version; hardened by the ingestion work)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import flowio
import numpy as np

from predictor.errors import FCSError

__all__ = ["FCSData", "read_fcs", "write_fcs"]


@dataclass(frozen=True)
class FCSData:
    """Events of one FCS file and what describes them.

    Attributes
    ----------
    path : Path
    events : np.ndarray
        float32, shape (n_events, n_channels), channel order of the file.
    pnn, pns : list[str]
        Channel names (``$PnN``) and marker descriptions (``$PnS``, '' when absent).
    version : str
    text : dict[str, str]
        The TEXT segment, lower-case keys without '$'.
    quirks : list[str]
        Problems found and worked around while reading.
    """

    path: Path
    events: np.ndarray
    pnn: list[str]
    pns: list[str]
    version: str
    text: dict[str, str] = field(repr=False)
    quirks: list[str] = field(default_factory=list)

    @property
    def n_events(self) -> int:
        return int(self.events.shape[0])


def read_fcs(path: str | os.PathLike) -> FCSData:
    """Read one FCS file into float32 events plus its channel table."""
    path = Path(path)
    quirks: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fd = flowio.FlowData(str(path), ignore_offset_error=True)
        quirks += [str(w.message) for w in caught]
    except FileNotFoundError:
        raise FCSError(f"{path}: file not found. Check the path.") from None
    except Exception as exc:  # flowio raises many types on corrupt files
        raise FCSError(f"{path}: not a readable FCS file ({exc}).") from None
    n_ch = fd.channel_count
    events = np.asarray(fd.events, dtype=np.float32).reshape(-1, n_ch)
    chans = [fd.channels[i + 1] for i in range(n_ch)]
    pnn = [c.get("pnn", f"P{i + 1}") for i, c in enumerate(chans)]
    pns = [c.get("pns", "") or "" for c in chans]
    return FCSData(path, events, pnn, pns, str(fd.version), dict(fd.text), quirks)


def write_fcs(
    path: str | os.PathLike,
    events: np.ndarray,
    pnn: list[str],
    pns: list[str] | None = None,
    *,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write events as an FCS 3.1 file (float32), atomically (temp file + rename)."""
    path = Path(path)
    events = np.ascontiguousarray(events, dtype=np.float32)
    if events.ndim != 2 or events.shape[1] != len(pnn):
        raise FCSError(f"{path}: events must have shape (n, {len(pnn)}); got {events.shape}.")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        flowio.create_fcs(fh, events.ravel(), list(pnn), opt_channel_names=pns,
                          metadata_dict=metadata or {})
    os.replace(tmp, path)
    return path
