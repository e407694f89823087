"""A minimal FCS writer for tests: every byte under the test's control.

``build_fcs`` returns the bytes of an FCS file (any version, data type, byte order, delimiter),
which tests then write as they are or corrupt on purpose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT_START = 256


def encode_events(
    events: np.ndarray, *, datatype: str = "F", byteorder: str = "<", bits: list[int] | None = None
) -> bytes:
    """Bytes of the DATA segment."""
    events = np.asarray(events)
    n, p = events.shape
    if datatype == "F":
        return np.ascontiguousarray(events, dtype=f"{byteorder}f4").tobytes()
    if datatype == "D":
        return np.ascontiguousarray(events, dtype=f"{byteorder}f8").tobytes()
    bits = bits or [16] * p
    fields = np.dtype([(f"c{i}", f"{byteorder}u{b // 8}") for i, b in enumerate(bits)])
    rec = np.zeros(n, dtype=fields)
    for i in range(p):
        rec[f"c{i}"] = events[:, i]
    return rec.tobytes()


def build_fcs(
    events: np.ndarray,
    pnn: list[str] | None = None,
    pns: list[str | None] | None = None,
    *,
    version: str = "3.0",
    datatype: str = "F",
    byteorder: str = "<",
    bits: list[int] | None = None,
    ranges: list[int] | None = None,
    delim: str = "/",
    keywords: dict[str, str | None] | None = None,
    header_offsets: tuple[int, int, int, int] | None = None,
    header_data: tuple[int, int] | None = None,
    text_offsets: bool = True,
    data_end_shift: int = 0,
    data: bytes | None = None,
    encoding: str = "utf-8",
    trailer: bytes = b"",
) -> bytes:
    """An FCS file as bytes.

    ``keywords`` overrides (value ``None`` removes a keyword; names with '$'). ``header_offsets``
    replaces the HEADER's (text begin, text end, data begin, data end), ``header_data``
    only its data offsets; ``data_end_shift`` moves
    the declared data end (HEADER and TEXT) by that many bytes; ``data`` replaces the DATA bytes.
    """
    events = np.asarray(events)
    n, p = events.shape
    pnn = pnn or [f"Ch{i + 1}" for i in range(p)]
    pns = pns if pns is not None else [f"M{i + 1}" for i in range(p)]
    width = {"F": 32, "D": 64}.get(datatype)
    bits = bits or [width or 16] * p
    payload = data if data is not None else encode_events(
        events, datatype=datatype, byteorder=byteorder, bits=bits
    )
    order = "1,2,3,4" if byteorder == "<" else "4,3,2,1"
    kw: dict[str, str] = {
        "$BYTEORD": order,
        "$DATATYPE": datatype,
        "$MODE": "L",
        "$NEXTDATA": "0",
        "$PAR": str(p),
        "$TOT": str(n),
    }
    for i in range(p):
        kw[f"$P{i + 1}N"] = pnn[i]
        kw[f"$P{i + 1}B"] = str(bits[i])
        kw[f"$P{i + 1}E"] = "0,0"
        kw[f"$P{i + 1}R"] = str(ranges[i] if ranges else 262144)
        if pns[i] is not None and pns[i] != "":
            kw[f"$P{i + 1}S"] = pns[i]
    for key, value in (keywords or {}).items():
        if value is None:
            kw.pop(key, None)
        else:
            kw[key] = value

    def text_for(d0: int, d1: int) -> bytes:
        items = dict(kw)
        if text_offsets and version != "2.0":
            items.setdefault("$BEGINDATA", str(d0))
            items.setdefault("$ENDDATA", str(d1))
            items.setdefault("$BEGINANALYSIS", "0")
            items.setdefault("$ENDANALYSIS", "0")
            items.setdefault("$BEGINSTEXT", "0")
            items.setdefault("$ENDSTEXT", "0")
        body = delim
        for k, v in items.items():
            v = v.replace(delim, delim * 2)
            body += f"{k}{delim}{v}{delim}"
        return body.encode(encoding)

    d0 = d1 = 0
    for _ in range(5):  # offsets appear in the TEXT, whose length they change
        text = text_for(d0, d1)
        new_d0 = TEXT_START + len(text)
        new_d1 = new_d0 + len(payload) - 1 + data_end_shift
        if (new_d0, new_d1) == (d0, d1):
            break
        d0, d1 = new_d0, new_d1
    t0, t1 = TEXT_START, TEXT_START + len(text) - 1
    hdr = header_offsets or (t0, t1, *(header_data or (d0, d1)))
    header = f"FCS{version}    " + "".join(f"{v:>8}" for v in hdr) + f"{0:>8}{0:>8}"
    head = header.encode("ascii").ljust(TEXT_START, b" ")
    return head + text + payload + trailer


def write_bytes(folder: Path, name: str, content: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(content)
    return path
