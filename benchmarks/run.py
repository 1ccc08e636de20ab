"""Run the benchmarks in this directory: ``python benchmarks/run.py [--out DIR] [--list] [NAME ...]``.

Every ``bench_*.py`` next to this file is a benchmark. It is run as a script in its own process (so imports,
threads and allocator state do not leak from one benchmark to the next) and must print a JSON object on its last
line of output; that object is saved to ``<out>/<name>.json``. See README.md for how results are stated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="result directory (%(default)s)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)

    found = discover()
    if args.list:
        print("\n".join(found) if found else "(no benchmarks)")
        return 0
    unknown = sorted(set(args.names) - set(found))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {sorted(found)}")
    selected = {n: found[n] for n in (args.names or found)}
    if not selected:
        print(f"No benchmarks yet: add benchmarks/bench_<name>.py (see {HERE / 'README.md'}).")
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, path in selected.items():
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        lines = proc.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            result = None
        if proc.returncode != 0 or not isinstance(result, dict):
            failed.append(name)
            print(f"!! {name} failed (exit {proc.returncode}) or printed no JSON object on its last line")
            continue
        result.setdefault("wall_seconds", seconds)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"-> {args.out / f'{name}.json'} ({seconds:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
