"""Per-sample result cache keyed by file content and settings.

A re-run skips samples already done, and an interrupted run resumes where it stopped. Entries
are written atomically (temporary folder + rename), so a killed worker never leaves a half
entry. On a cluster, put the cache on storage every worker can reach.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["file_digest", "settings_digest", "SampleCache"]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's contents."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def settings_digest(*parts: Any) -> str:
    """Stable digest of JSON-able settings."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class SampleCache:
    """A folder of entries, each a few Parquet tables plus a JSON dict."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> tuple[dict[str, pd.DataFrame], dict[str, Any]] | None:
        d = self._dir(key)
        meta = d / "meta.json"
        if not meta.is_file():
            return None
        try:
            info = json.loads(meta.read_text())
            tables = {name: pd.read_parquet(d / f"{name}.parquet") for name in info["tables"]}
        except (OSError, ValueError, KeyError):
            return None  # unreadable entry: recompute
        return tables, info["data"]

    def put(self, key: str, tables: dict[str, pd.DataFrame], data: dict[str, Any]) -> None:
        d = self._dir(key)
        if d.exists():
            return
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = d.with_name(f".{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, df in tables.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        (tmp / "meta.json").write_text(json.dumps({"tables": list(tables), "data": data}, default=str))
        try:
            os.rename(tmp, d)
        except OSError:  # another worker wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
