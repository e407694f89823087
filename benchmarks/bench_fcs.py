"""FCS reading: throughput of ``read_fcs`` against a bare numpy read, and its peak memory.

The reference reads the same bytes from disk and wraps them with ``np.frombuffer`` (the
floor for any reader that returns an array; for big-endian files plus the conversion to native
floats that any reader must do). Peak memory is measured in a fresh subprocess:
the growth of the resident set while reading, relative to the bytes of the events.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._common import BenchResult, best_time, peak_rss_mb
from predictor.io.fcs import read_fcs, read_fcs_header, write_fcs

N_CHANNELS = 40

_MEMORY_PROBE = """
import json, sys
from predictor.io.fcs import read_fcs

def status_mb(key):
    # VmHWM belongs to this process image; ru_maxrss would include the parent's RSS at fork.
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith(key + ":"))
    return int(line.split()[1]) / 1024

before = status_mb("VmRSS")
sample = read_fcs(sys.argv[1], warn=False)
peak = status_mb("VmHWM")
print(json.dumps({"before": before, "peak": peak, "nbytes": sample.events.nbytes}))
"""


def _write(folder: Path, n_events: int) -> Path:
    rng = np.random.default_rng(0)
    events = rng.gamma(1.0, 30.0, size=(n_events, N_CHANNELS)).astype(np.float32)
    return write_fcs(folder / "bench.fcs", events, [f"Ch{i}" for i in range(N_CHANNELS)])


def _big_endian_copy(path: Path, start: int, n_bytes: int) -> Path:
    """The same file with big-endian floats (as CyTOF software often writes them)."""
    content = bytearray(path.read_bytes())
    at = content.index(b"$BYTEORD")
    content[at : at + 18] = content[at : at + 18].replace(b"1,2,3,4", b"4,3,2,1")
    data = np.frombuffer(bytes(content[start : start + n_bytes]), dtype="<f4")
    content[start : start + n_bytes] = data.astype(">f4").tobytes()
    out = path.with_name("bench_be.fcs")
    out.write_bytes(bytes(content))
    return out


def _reference_read(path: Path, start: int, n_bytes: int, n_events: int,
                    dtype: str = "<f4") -> np.ndarray:
    with open(path, "rb") as fh:
        fh.seek(start)
        buf = fh.read(n_bytes)
    return np.frombuffer(buf, dtype=dtype).reshape(n_events, N_CHANNELS)


def _peak_ratio(path: Path) -> float:
    """Resident-memory growth while reading ``path`` in a fresh process, over the event bytes."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path)], capture_output=True, text=True,
        check=True, cwd=root,
    )
    probe = json.loads(out.stdout)
    return (probe["peak"] - probe["before"]) / (probe["nbytes"] / 2**20)


def run(quick: bool = False) -> list[BenchResult]:
    """Benchmark FCS reading on a 1M × 40 float32 file (200k events when ``quick``)."""
    n_events = 200_000 if quick else 1_000_000
    repeat = 9 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench_fcs_") as tmp:
        path = _write(Path(tmp), n_events)
        header = read_fcs_header(path)
        mb = header.data_bytes / 2**20
        read_fcs(path)  # warm the page cache for both readers
        t_ours = best_time(lambda: read_fcs(path), repeat=repeat)
        t_ref = best_time(
            lambda: _reference_read(path, header.data_start, header.data_bytes, n_events),
            repeat=repeat,
        )
        t_header = best_time(lambda: read_fcs_header(path), repeat=repeat)
        ratio = _peak_ratio(path)
        be = _big_endian_copy(path, header.data_start, header.data_bytes)
        read_fcs(be)
        t_be = best_time(lambda: read_fcs(be), repeat=repeat)
        t_be_ref = best_time(  # a reader must return native floats: swap bytes
            lambda: _reference_read(be, header.data_start, header.data_bytes, n_events,
                                    ">f4").astype(np.float32),
            repeat=repeat,
        )
        ratio_be = _peak_ratio(be)
    size = f"{n_events // 1000}k x {N_CHANNELS}"
    return [
        BenchResult(f"read_fcs throughput ({size} float32)", mb / t_ours, "MB/s",
                    reference=mb / t_ref, reference_name="np.frombuffer",
                    target="ratio >= 0.8"),
        BenchResult(f"read_fcs peak memory / event bytes ({size})", ratio, "x",
                    target="<= 2.0"),
        BenchResult(f"read_fcs throughput ({size} big-endian)", mb / t_be, "MB/s",
                    reference=mb / t_be_ref, reference_name="frombuffer('>f4').astype",
                    target="ratio >= 0.8"),
        BenchResult(f"read_fcs peak memory / event bytes ({size} big-endian)", ratio_be, "x",
                    target="<= 2.0"),
        BenchResult("read_fcs_header time", t_header * 1000, "ms", target="< 5 ms"),
        BenchResult("benchmark process peak RSS", peak_rss_mb(), "MiB"),
    ]


if __name__ == "__main__":
    for result in run(quick="--quick" in sys.argv):
        print(result.line())
