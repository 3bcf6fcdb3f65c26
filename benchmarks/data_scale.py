"""How `sftlab data clean` grows with the row count: rows/s and peak memory at several sizes, for each way of
running it, beside the path before streaming (a git worktree of --baseline, where it still fits), with the
extrapolation to 10M rows.

    .venv/bin/python benchmarks/data_scale.py [--rows 100000,250000,1000000] [--repeats 3]
        [--variants single,pool2,datatrove2] [--baseline af5542c --baseline_max 250000] [--repeats_above 1]
        [--shape near_duplicates] [--agreement 20000]

Rows are data_pipeline.py's Alpaca-like rows with its planted defects of every kind (dirty_data.py). Each run is
`sftlab data clean FILE --model sftlab:tiny-glm4 --max_length 1024` in its own process:
  single      --num_proc 1 (one process)
  pool2       --num_proc 2 (sftlab's worker pool: 2 workers and the deciding process)
  datatrove2  --datatrove_tasks 2 --num_proc 2 (2 datatrove tasks on LocalPipelineExecutor, then the decisions)
  baseline    the --baseline commit's `data clean` with its defaults (one worker per core past 4,096 rows)
Variants and sizes are interleaved (A B A B ...), the median of --repeats is reported (sizes over 250,000 rows:
--repeats_above runs, since a million rows takes minutes a run). Peak memory is the largest resident set of the
command's processes (getrusage of the children, which waits for every one), so for the pool and datatrove it is
the largest single process.
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
VARIANTS = {"single": ["--num_proc", "1"], "pool2": ["--num_proc", "2"],
            "datatrove2": ["--datatrove_tasks", "2", "--num_proc", "2"], "baseline": []}


def write_rows(path: Path, n: int) -> int:
    """n generated rows and their planted defects, written a chunk at a time (a million rows do not fit twice)."""
    written = 0
    with open(path, "wb") as f:
        for start in range(0, n, 100_000):
            lines = with_defects(make_rows(min(100_000, n - start), seed=start), MAX_LENGTH, seed=start)
            f.write(b"\n".join(lines) + b"\n")
            written += len(lines)
    return written


# Templated rows as public instruction sets hold them: a long fixed instruction, a short variable part. Rows of one
# template share most of their 5-grams, so they share LSH buckets by the thousand though few are near duplicates.
TEMPLATES = [
    ("Below is an instruction that describes a task, paired with an input that provides further context. Write a "
     "response that appropriately completes the request.\n\n### Instruction:\nSummarize the following text in one "
     "sentence, keeping its main claim and leaving out examples.\n\n### Input:\n{a}", "In short: {b}."),
    ("You are given a customer review of a product bought online. Classify its sentiment as positive, negative or "
     "neutral, and explain in one sentence which words of the review decided it. Review: {a}",
     "The sentiment is {c}: the words '{d}' and '{e}' decided it."),
    ("Translate the sentence below from English into French. Keep names as they are, use the formal register, and "
     "give only the translation, without notes or alternatives.\nSentence: {a}", "Traduction : {b}."),
    ("Read the question and answer it with a short explanation a student could follow, then give the final answer "
     "on a line of its own starting with 'Answer:'.\nQuestion: {a}", "{b}.\nAnswer: {d}"),
]


def near_duplicate_rows(n: int, seed: int, share: float = 0.65) -> list[bytes]:
    """n templated Alpaca rows of which about `share` are small variations (a word changed, a mark added) of an
    earlier row: the shape of public rows repeated with small variations, where cleaning once slowed with the
    row count."""
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    originals, lines = [], []
    for _ in range(n):
        if originals and rng.random() < share:
            instruction, output = rng.choice(originals)
            if rng.random() < 0.5:
                parts = instruction.rsplit(" ", 3)
                instruction = " ".join([parts[0], rng.choice(words), *parts[2:]])
            else:
                output = output + rng.choice(["!", " :)", "..", " Thanks."])
        else:
            template, reply = rng.choice(TEMPLATES)
            fill = {key: " ".join(rng.choices(words, k=rng.randint(8, 16))) for key in "ab"}
            fill.update({key: rng.choice(words) for key in "cde"})
            instruction, output = template.format(**fill), reply.format(**fill)
            originals.append((instruction, output))
        lines.append(json.dumps({"instruction": instruction, "input": "", "output": output}).encode())
    return lines


def write_near_duplicates(path: Path, n: int) -> int:
    with open(path, "wb") as f:
        f.write(b"\n".join(near_duplicate_rows(n, seed=0)) + b"\n")
    return n


def decision_agreement(n: int) -> None:
    """How the bounded rule's decisions (BUCKET_CAP representatives per bucket) differ from comparing every pair of
    rows that share a bucket, on n near-duplicate-heavy rows, in this process."""
    import dataclasses

    from sftlab.config import CleanArguments
    from sftlab.data import dedup
    from sftlab.data.cleaner import clean_rows
    from sftlab.data.load import SourceRow

    rows = [SourceRow("sample.jsonl", i + 1, json.loads(line)) for i, line in enumerate(near_duplicate_rows(n, 1))]
    config = dataclasses.replace(CleanArguments(), num_proc=1)
    kept, seconds = {}, {}
    for rule, cap in (("every pair", 10**9), (f"{dedup.BUCKET_CAP} per bucket", dedup.BUCKET_CAP)):
        dedup.BUCKET_CAP = cap
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            result = clean_rows(rows, config, None, work_dir=Path(work))
        seconds[rule] = time.perf_counter() - started
        kept[rule] = {(k.source, k.line) for k in result.kept}
    exact, bounded = kept.values()
    print(f"decisions on {n:,} near-duplicate-heavy rows: every pair kept {len(exact):,} "
          f"({seconds['every pair']:.0f} s), the bounded rule {len(bounded):,} ({list(seconds.values())[1]:.0f} s); "
          f"kept by the bounded rule only {len(bounded - exact):,} ({len(bounded - exact) / n:.3%} of rows), by every "
          f"pair only {len(exact - bounded):,} ({len(exact - bounded) / n:.3%})")


def clean_once(path: Path, out: Path, variant: str, baseline_src: Path | None) -> dict:
    command = [sys.executable, "-m", "sftlab.cli", "data", "clean", str(path), "--model", "sftlab:tiny-glm4",
               "--max_length", str(MAX_LENGTH), "--output", str(out), *VARIANTS[variant]]
    env = {**os.environ, **({"PYTHONPATH": str(baseline_src)} if variant == "baseline" else {})}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEASURED, *command], capture_output=True, text=True,
                            cwd=REPO, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"sftlab data clean ({variant}) failed:\n{result.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {"seconds": seconds, "peak_mb": int(result.stdout.strip().splitlines()[-1]) / 1024,
            "kept": report["kept"], "clean": (out / "clean.jsonl").stat().st_size}


def baseline_worktree(commit: str, folder: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=REPO, check=True,
                   capture_output=True)
    return folder / "src"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="100000,250000,1000000", help="Comma-separated sizes (generated rows).")
    parser.add_argument("--variants", default="single,pool2,datatrove2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats_above", type=int, default=1, help="Runs of sizes over 250,000 rows.")
    parser.add_argument("--baseline", default=None, help="A commit of the path before streaming, e.g. af5542c.")
    parser.add_argument("--baseline_max", type=int, default=250_000, help="The largest size the baseline runs.")
    parser.add_argument("--shape", default="dirty", choices=["dirty", "near_duplicates"],
                        help="dirty: Alpaca-like rows with planted defects; near_duplicates: templated rows, about "
                             "65%% of them small variations of earlier ones.")
    parser.add_argument("--agreement", type=int, default=0, help="Also compare the bounded near-duplicate rule's "
                        "decisions with every pair's on this many near_duplicates rows (0: no).")
    args = parser.parse_args(argv)
    if args.agreement:
        decision_agreement(args.agreement)
    sizes, variants = [int(n) for n in args.rows.split(",")], args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        baseline_src = baseline_worktree(args.baseline, Path(tmp) / "baseline") if args.baseline else None
        if baseline_src:
            variants.append("baseline")
        files = {n: Path(tmp) / f"rows_{n}.jsonl" for n in sizes}
        write = write_near_duplicates if args.shape == "near_duplicates" else write_rows
        lines = {n: write(files[n], n) for n in sizes}
        runs = {(n, v): [] for n in sizes for v in variants}
        print(f"sftlab data clean, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start",
              flush=True)
        try:
            for repeat in range(args.repeats):  # interleaved: every size and variant once per round
                for n in sizes:
                    for v in variants:
                        skip = v == "baseline" and n > args.baseline_max
                        if skip or (n > 250_000 and repeat >= args.repeats_above):
                            continue
                        runs[n, v].append(clean_once(files[n], Path(tmp) / f"out_{n}_{v}", v, baseline_src))
                        run = runs[n, v][-1]
                        print(f"  round {repeat + 1}: {v:10s} {lines[n]:>9,} rows in {run['seconds']:6.1f} s, "
                              f"peak {run['peak_mb']:,.0f} MB", flush=True)
        finally:
            if baseline_src:
                subprocess.run(["git", "worktree", "remove", "--force", str(baseline_src.parent)], cwd=REPO)
    table = [{"variant": v, "rows": lines[n], "runs": len(r), "seconds": statistics.median(x["seconds"] for x in r),
              "peak_mb": statistics.median(x["peak_mb"] for x in r), "kept": r[0]["kept"], "clean": r[0]["clean"]}
             for (n, v), r in runs.items() if r]
    outputs = {(row["rows"], row["kept"], row["clean"]) for row in table}
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; every variant kept the same rows at each size: "
          f"{len(outputs) == len(sizes)}\n")
    print_table(table, variants)
    return table


def print_table(table: list[dict], variants: list[str]) -> None:
    """Each variant at each size (with the ratio to the baseline's run at that size), then how time and memory
    per row grow from the second-largest size to the largest."""
    print("| variant | rows | runs | rows/s | peak RSS | vs baseline (time, memory) |\n"
          "| --- | ---: | ---: | ---: | ---: | --- |")
    base = {row["rows"]: row for row in table if row["variant"] == "baseline"}
    for row in sorted(table, key=lambda r: (r["variant"], r["rows"])):
        ref = base.get(row["rows"])
        ratio = (f"{ref['seconds'] / row['seconds']:.2f}x faster, {row['peak_mb'] / ref['peak_mb']:.2f}x memory"
                 if ref and row is not ref else "")
        print(f"| {row['variant']} | {row['rows']:,} | {row['runs']} | {row['rows'] / row['seconds']:,.0f} | "
              f"{row['peak_mb']:,.0f} MB | {ratio} |")
    for variant in variants:
        rows = sorted((r for r in table if r["variant"] == variant), key=lambda r: r["rows"])
        if len(rows) >= 2:
            small, large = rows[-2], rows[-1]
            slope = (large["peak_mb"] - small["peak_mb"]) / (large["rows"] - small["rows"])  # MB per row
            per_row = (large["seconds"] / large["rows"]) / (small["seconds"] / small["rows"])
            print(f"{variant}: from {small['rows']:,} to {large['rows']:,} rows, peak memory x"
                  f"{large['peak_mb'] / small['peak_mb']:.2f} ({slope * 1024:+.2f} KB a row: about "
                  f"{large['peak_mb'] + slope * (10_000_000 - large['rows']):,.0f} MB at 10M rows), time per row "
                  f"x{per_row:.2f} (10M rows: about {large['seconds'] / large['rows'] * 1e7 / 3600:.1f} h)")


if __name__ == "__main__":
    main()
