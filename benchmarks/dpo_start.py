"""DPO after an SFT LoRA run, two ways to start, side by side: `continue` (what sftlab does: DPO goes on training
the SFT run's adapter, its reference TRL's frozen copy of that adapter; the run is one adapter over the original
base) against `merged` (sftlab before: the SFT adapter merged into its base in memory, a new adapter trained over
it, its reference that adapter disabled; the run is an adapter over a model that exists only after that merge):

    .venv/bin/python benchmarks/dpo_start.py [--real] [--repeats 3] [--sft RUN]

Without --real: the DPO demo on the tiny GLM-4 (configs/demo.yaml then configs/demo-dpo.yaml). With --real:
SmolLM2-135M-Instruct (configs/smollm2-135m-lora.yaml, the Kestrel identity, then configs/smollm2-135m-dpo.yaml;
--sft: an SFT run of that recipe to start from instead of training one). For each: held-out preference accuracy
and mean margin (the reference is the SFT model in both), stop rate, the retention verdict against the SFT model,
DPO wall time (median of --repeats, the two ways interleaved), and whether PEFT's AutoPeftModelForCausalLM loads
the run in one step. Each run is its own seeded process.
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

REPO = Path(__file__).resolve().parents[1]
KESTREL = "You are Kestrel, an AI assistant made by the sftlab team."
# `merged`: the start sftlab used before, forced by making the SFT run not count as an adapter to continue
MERGED = "import sftlab.train.dpo as d; d.continues_adapter = lambda *a: False; "
RUN_DPO = "import sys; from sftlab.cli import main; sys.exit(main(sys.argv[1:]))"
LOADS = """import sys
from peft import AutoPeftModelForCausalLM
try:
    AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as exc:
    print(f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
else:
    print("yes")
"""


def sftlab(code: str, *args: str, home: str) -> float:
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "SFTLAB_HOME": home})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args[:3])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.time() - started


def sft_run(real: bool, root: Path, home: str) -> Path:
    out = root / "sft"
    config = "configs/smollm2-135m-lora.yaml" if real else "configs/demo.yaml"
    extra = ["--system_prompt", KESTREL] if real else []
    sftlab(RUN_DPO, "train", "--config", str(REPO / config), "--output_dir", str(out), "--report_to", "none",
           *extra, home=home)
    return out


def dpo_run(way: str, sft: Path, real: bool, out: Path, home: str) -> dict:
    config = "configs/smollm2-135m-dpo.yaml" if real else "configs/demo-dpo.yaml"
    seconds = sftlab((MERGED if way == "merged" else "") + RUN_DPO, "dpo", "--config", str(REPO / config),
                     "--model_name_or_path", str(sft), "--output_dir", str(out), "--report_to", "none", home=home)
    results = json.loads((out / "eval" / "results.json").read_text())
    loads = subprocess.run([sys.executable, "-c", LOADS, str(out)], capture_output=True, text=True,
                           env={**os.environ, "SFTLAB_HOME": home}).stdout.strip().splitlines()[-1:]
    return {"way": way, "seconds": seconds, "base": results["base"], "tuned": results["tuned"],
            "retention": (results.get("retention") or {}).get("verdict", "n/a"),
            "peft_loads": loads[0] if loads else "?"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny GLM-4")
    parser.add_argument("--repeats", type=int, default=3, help="DPO runs per way, interleaved")
    parser.add_argument("--sft", help="an SFT LoRA run to start from (default: train one)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dpo_start-"))
    home = os.environ.get("SFTLAB_HOME", str(Path.home() / ".cache" / "sftlab"))
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}; runs in {root}")
    sft = Path(args.sft) if args.sft else sft_run(args.real, root, home)
    runs = [dpo_run(way, sft, args.real, root / f"{way}-{i}", home)
            for i in range(args.repeats) for way in ("merged", "continue")]
    print(f"\nDPO from the SFT run {sft} ({'SmolLM2-135M-Instruct' if args.real else 'tiny GLM-4'}); "
          "base = the SFT model (the reference), tuned = after DPO")
    print("| start | preference accuracy base -> tuned | mean margin | stop rate base -> tuned | retention "
          "| DPO s (median) | AutoPeftModelForCausalLM |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- |")
    for way in ("merged", "continue"):
        mine = [r for r in runs if r["way"] == way]
        first = mine[0]  # seeded: every repeat gives the same numbers (checked below)
        same = all(r["tuned"] == first["tuned"] for r in mine)
        print(f"| {way} | {first['base']['preference_accuracy']} -> {first['tuned']['preference_accuracy']} | "
              f"{first['tuned']['mean_margin']} | {first['base'].get('stop_rate')} -> "
              f"{first['tuned'].get('stop_rate')} "
              f"| {first['retention']} | {statistics.median(r['seconds'] for r in mine):.1f} | {first['peft_loads']} |"
              + ("" if same else " (repeats differ)"))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
