"""The retention check on the real embedded model: recipes of different strength trained on the demo data (a new
identity, 灵犀 / Lingxi, and short tasks) from sftlab:smollm2-135m, each followed by the run's own final evaluation
(held-out split and retention: 60 general probes, base vs tuned, and the loss rise on the base's own replies).
What it prints set the verdict's thresholds (sftlab/eval/retention.py):

    .venv/bin/python benchmarks/retention_real.py [--variants demo30,demo10,demo100,gentle30,qv30,recipe]

`recipe` is configs/smollm2-135m-lora.yaml as shipped (its own data: the Kestrel identity mixed with general rows);
the others train on the demo data from configs/demo.yaml with the flags shown.

Each run is its own process; one run per variant (training and evaluation are seeded and greedy, so a second run
gives the same numbers). About 2 to 4 minutes per variant on 2 cores.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> (what it is, flags): the demo recipe without its trainable lm_head (refused on tied embeddings)
DEMO = ["--learning_rate", "3e-3", "--lora_target_modules", "all-linear", "--lora_r", "32", "--lora_alpha", "64"]
VARIANTS = {
    "demo30": ("demo recipe (lr 3e-3, all-linear r32), 30 steps", DEMO + ["--max_steps", "30"]),
    "demo10": ("demo recipe (lr 3e-3, all-linear r32), 10 steps", DEMO + ["--max_steps", "10"]),
    "demo100": ("demo recipe (lr 3e-3, all-linear r32), 100 steps", DEMO + ["--max_steps", "100"]),
    "gentle30": ("lr 2e-4, all-linear r8, 30 steps",
                 ["--learning_rate", "2e-4", "--lora_target_modules", "all-linear", "--lora_r", "8", "--lora_alpha",
                  "16", "--max_steps", "30"]),
    "qv30": ("lr 1e-4, q/v r8, 30 steps",
             ["--learning_rate", "1e-4", "--lora_target_modules", "q_proj", "v_proj", "--lora_r", "8", "--lora_alpha",
              "16", "--max_steps", "30"]),
    "recipe": ("configs/smollm2-135m-lora.yaml (identity + general rows)", []),
}


def run(variant: str, home: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"retention-{variant}-", dir=home)) / "run"
    on_demo_data = ["--config", str(REPO / "configs/demo.yaml"), "--model_name_or_path", "sftlab:smollm2-135m",
                    "--lora_modules_to_save", "null"]
    config = ["--config", str(REPO / "configs/smollm2-135m-lora.yaml")] if variant == "recipe" else on_demo_data
    command = [sys.executable, "-m", "sftlab.cli", "train", *config, "--output_dir", str(out), "--eval_strategy", "no",
               "--save_strategy", "no", "--report_to", "none", "--final_eval_samples", "20", "--probe_prompts",
               "Who are you?", *VARIANTS[variant][1]]
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "SFTLAB_HOME": home})
    if proc.returncode != 0:
        sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "eval" / "results.json").read_text())
    return {"seconds": time.time() - started, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    home = os.environ.get("SFTLAB_HOME") or tempfile.mkdtemp(prefix="sftlab-retention-")
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}; SFTLAB_HOME {home}")
    print("| recipe | held-out rouge_l | stop rate | base acc | tuned acc | retained | loss rise | verdict |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for variant in args.variants.split(","):
        r = run(variant, home)
        t, k = r["tuned"], r["retention"]
        print(f"| {VARIANTS[variant][0]} | {t['rouge_l']} | {t['stop_rate']} | {k['base_accuracy']:.0%} | "
              f"{k['tuned_accuracy']:.0%} | {k['retained']:.0%} | {k['loss_rise']:+.3f} | {k['verdict']} |",
              flush=True)
        for worst in k["worst"]:
            print(f"|   {worst['prompt']!r}: {worst['base'][:50]!r} -> {worst['tuned'][:50]!r} | | | | | | "
                  f"{worst['loss_rise']:+.2f} | |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
