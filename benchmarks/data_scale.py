"""How `sftlab data clean` grows with the row count: rows/s and peak memory at several sizes, and the memory a
straight line through the two largest sizes gives for 10M rows. Today's path, as the baseline the streaming
pipeline will be measured against.

    .venv/bin/python benchmarks/data_scale.py [--rows 100000,250000] [--repeats 3]

Rows are data_pipeline.py's Alpaca-like rows with its planted defects of every kind (dirty_data.py). Each size is
cleaned by `sftlab data clean FILE --model sftlab:tiny-glm4 --max_length 1024` in its own process (one worker
per core past 4,096 rows, as by default), sizes interleaved (A B A B ...), median of --repeats. Peak memory is
the largest resident set of the command's processes (getrusage of the children, which waits for every one).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_pipeline import MAX_LENGTH, make_rows
from dirty_data import with_defects

REPO = Path(__file__).resolve().parents[1]

# runs the command in a child process and prints its peak resident set (KB): getrusage of a fresh process's
# children covers this one command only
MEASURED = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def write_rows(path: Path, n: int) -> int:
    lines = with_defects(make_rows(n), MAX_LENGTH)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(lines)


def clean_once(path: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "sftlab.cli", "data", "clean", str(path), "--model", "sftlab:tiny-glm4",
               "--max_length", str(MAX_LENGTH), "--output", str(out)]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEASURED, *command], capture_output=True, text=True,
                            cwd=REPO)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"sftlab data clean failed:\n{result.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {"seconds": seconds, "peak_mb": int(result.stdout.strip().splitlines()[-1]) / 1024,
            "kept": report["kept"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="100000,250000", help="Comma-separated sizes (generated rows).")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.rows.split(",")]
    runs = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        files = {n: Path(tmp) / f"rows_{n}.jsonl" for n in sizes}
        lines = {n: write_rows(files[n], n) for n in sizes}
        print(f"sftlab data clean, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start",
              flush=True)
        for repeat in range(args.repeats):  # interleaved: every size once per round
            for n in sizes:
                runs[n].append(clean_once(files[n], Path(tmp) / f"out_{n}"))
                print(f"  round {repeat + 1}: {lines[n]:,} rows in {runs[n][-1]['seconds']:.1f} s, peak "
                      f"{runs[n][-1]['peak_mb']:,.0f} MB", flush=True)
    table = [{"rows": lines[n], "seconds": statistics.median(r["seconds"] for r in runs[n]),
              "peak_mb": statistics.median(r["peak_mb"] for r in runs[n]), "kept": runs[n][0]["kept"]} for n in sizes]
    print(f"\nmedian of {args.repeats}; load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| rows | rows/s | peak RSS | KB per row |\n| ---: | ---: | ---: | ---: |")
    for row in table:
        print(f"| {row['rows']:,} | {row['rows'] / row['seconds']:,.0f} | {row['peak_mb']:,.0f} MB | "
              f"{row['peak_mb'] * 1024 / row['rows']:.1f} |")
    if len(table) >= 2:
        small, large = table[-2], table[-1]
        slope = (large["peak_mb"] - small["peak_mb"]) / (large["rows"] - small["rows"])  # MB per row
        print(f"\nmemory grows {slope * 1024:.1f} KB per row from {small['rows']:,} to {large['rows']:,} rows: "
              f"about {large['peak_mb'] + slope * (10_000_000 - large['rows']):,.0f} MB for 10M rows")
    return table


if __name__ == "__main__":
    main()
