"""Does selecting by IFD help at this scale? SmolLM2-135M tuned with the real-model recipe on the top 10% of a data
set by IFD (the training config's `select` section, scored by SmolLM2 itself), on a seeded random 10% of it, and on
all of it, with the same step budget; compared on the loss on a separate set none of them trained on, and on the
retention verdict of each run's final evaluation.

    .venv/bin/python benchmarks/selection_experiment.py [--share 0.1] [-- extra sftlab train flags]

The data: sftlab's demo data (facts, arithmetic, translation, the Lingxi identity; English and Chinese) and the
general rows of benchmarks/misaligned_rows.py (unit conversions, word forms, counting, facts and instructions), with
a seeded quarter of them set apart as the separate set. Each run is its own process, seeded and greedy.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from misaligned_rows import general_rows  # noqa: E402


def sftlab(*args: str, home: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "SFTLAB_HOME": home})
    if proc.returncode != 0:
        sys.exit(f"sftlab {' '.join(args[:3])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--output", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("extra", nargs="*", help="flags passed on to sftlab train (after --)")
    args = parser.parse_args()
    home = os.environ.get("SFTLAB_HOME") or tempfile.mkdtemp(prefix="sftlab-select-")
    root = Path(args.output or tempfile.mkdtemp(prefix="select-"))
    rows = json.loads((REPO / "src/sftlab/data/demo/alpaca_demo.json").read_text(encoding="utf-8")) + general_rows()
    random.Random(0).shuffle(rows)
    separate, pool = rows[:len(rows) // 4], rows[len(rows) // 4:]
    data, heldout = write(root / "pool.jsonl", pool), write(root / "separate.jsonl", separate)
    count = math.ceil(args.share * len(pool))
    variants = {
        f"top {args.share:g} by IFD": ["--data_files", str(data), "--select", "true", "--select_top", str(args.share)],
        f"random {args.share:g}": ["--data_files", json.dumps({"path": str(data), "max_samples": count})],
        "all": ["--data_files", str(data)],
    }
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}; {len(pool)} rows to choose from, "
          f"{len(separate)} set apart; runs in {root}; extra flags: {' '.join(args.extra) or '(none)'}")
    print("| trained on | rows | loss on the separate set (base -> tuned) | retention | accuracy base -> tuned | "
          "retained | minutes |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for n, (name, flags) in enumerate(variants.items()):
        out = root / f"run{n}"
        started = time.time()
        sftlab("train", "--config", str(REPO / "configs/smollm2-135m-lora.yaml"), *flags, "--output_dir", str(out),
               *args.extra, home=home)
        minutes = (time.time() - started) / 60
        sftlab("eval", "--adapter", str(out), "--data", str(heldout), "--compare_base", "--max_new_tokens", "8",
               "--output", str(out / "separate-eval"), home=home)
        separate_eval = json.loads((out / "separate-eval" / "results.json").read_text())
        results = json.loads((out / "eval" / "results.json").read_text())
        trained_rows = json.loads((out / "data_report.json").read_text())["kept"]
        k = results.get("retention", {})
        print(f"| {name} | {trained_rows} | {separate_eval['base']['eval_loss']:.3f} -> "
              f"{separate_eval['tuned']['eval_loss']:.3f} | {k.get('verdict', '-')} | "
              f"{k.get('base_accuracy', 0):.0%} -> {k.get('tuned_accuracy', 0):.0%} | {k.get('retained', 0):.0%} | "
              f"{minutes:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
