"""Run the benchmarks: ``python -m benchmarks.run [--quick] [NAME ...]``.

Each ``benchmarks/bench_<name>.py`` has ``run(quick: bool) -> list[BenchResult]``; each result
is printed with its ratio against a reference measured in the same run, on the same machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

import benchmarks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    found = sorted(
        m.name.removeprefix("bench_") for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name.startswith("bench_")
    )
    names = args.names or found
    unknown = sorted(set(names) - set(found))
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; have {', '.join(found)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        for r in mod.run(quick=args.quick):
            print("  " + r.line(), flush=True)
            rows.append({"bench": name, **r.__dict__, "ratio": r.ratio})
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
