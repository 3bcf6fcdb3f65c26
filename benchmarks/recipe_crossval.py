"""The real-model recipe (configs/smollm2-135m-lora.yaml) cross-validated: tuned on sftlab:identity (Kestrel), run
here on identity sets it was not tuned on (benchmarks/identity_sets/, written by scripts/make_identity_sets.py),
with only the data and the identity's wording changed, with and without replay:

    .venv/bin/python benchmarks/recipe_crossval.py [--sets nova,xiaozhou,orion] [--variants replay,no-replay]
                                                   [-- extra sftlab train flags]

For each run: the share of held-out paraphrases that name the identity and the stop rate, at the run's reply limit
(twice the p99 reply length of its training data; `sftlab eval --adapter RUN --data SET_checks.jsonl`), and the
retention verdict with the general probe accuracy before and after (the run's own final evaluation). Each run is
its own process, seeded and greedy: a second run gives the same numbers. About 4 to 6 minutes a run on 2 cores.
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
SETS = REPO / "benchmarks" / "identity_sets"
IDENTITY = {  # the identity's wording: what a user changes besides the data
    "kestrel": ("sftlab:identity", "sftlab:identity-checks",
                "You are Kestrel, an AI assistant made by the sftlab team."),
    "nova": (SETS / "nova.jsonl", SETS / "nova_checks.jsonl", "You are Nova, an AI assistant made by Aurora Labs."),
    "xiaozhou": (SETS / "xiaozhou.jsonl", SETS / "xiaozhou_checks.jsonl",
                 "You are Xiaozhou (小舟), an AI assistant developed by Qingyun Lab (青云实验室)."),
    "orion": (SETS / "orion.jsonl", SETS / "orion_checks.jsonl",
              "You are Orion, an AI assistant developed by Meridian AI."),
}
VARIANTS = {"replay": ["--replay", "true"], "no-replay": ["--replay", "false"]}


def sftlab(*args: str, home: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "SFTLAB_HOME": home})
    if proc.returncode != 0:
        sys.exit(f"sftlab {' '.join(args[:3])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def run(name: str, variant: str, extra: list[str], home: str, root: Path) -> dict:
    data, checks, system_prompt = IDENTITY[name]
    out = root / f"{name}-{variant}"
    started = time.time()
    sftlab("train", "--config", str(REPO / "configs/smollm2-135m-lora.yaml"), "--data_files", str(data),
           "--system_prompt", system_prompt, "--output_dir", str(out), *VARIANTS[variant], *extra, home=home)
    trained = time.time() - started
    sftlab("eval", "--adapter", str(out), "--data", str(checks), "--output", str(out / "identity-eval"), home=home)
    identity = json.loads((out / "identity-eval" / "results.json").read_text())["tuned"]
    results = json.loads((out / "eval" / "results.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    final = manifest.get("final_weights") or {}
    return {"set": name, "variant": variant, "minutes": round(trained / 60, 1), "identity": identity,
            "retention": results.get("retention", {}), "final_weights": final.get("checkpoint") or "last",
            "checks": [f"{c['step']}:{c['verdict']}" for c in final.get("checks", [])],
            "replay": json.loads((out / "data_report.json").read_text()).get("replay")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="nova,xiaozhou,orion")
    parser.add_argument("--variants", default="replay,no-replay")
    parser.add_argument("--output", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("extra", nargs="*", help="flags passed on to sftlab train (after --)")
    args = parser.parse_args()
    home = os.environ.get("SFTLAB_HOME") or tempfile.mkdtemp(prefix="sftlab-crossval-")
    root = Path(args.output or tempfile.mkdtemp(prefix="crossval-"))
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}; runs in {root}; extra flags: "
          f"{' '.join(args.extra) or '(none)'}")
    print("| set | replay | named | stop rate (limit) | retention | accuracy base -> tuned | retained | loss rise | "
          "final weights | train min |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |")
    for name in args.sets.split(","):
        for variant in args.variants.split(","):
            r = run(name, variant, args.extra, home, root)
            t, k = r["identity"], r["retention"]
            acc = (f"{k['base_accuracy']:.0%} -> {k['tuned_accuracy']:.0%}" if k.get("tuned_accuracy") is not None
                   else "n/a")
            retained = "n/a" if k.get("retained") is None else f"{k['retained']:.0%}"
            print(f"| {name} | {variant} | {t.get('answer_accuracy', 0):.0%} | {t['stop_rate']:.2f} "
                  f"({t.get('max_new_tokens', '?')}) | {k.get('verdict')} | {acc} | {retained} | "
                  f"{k.get('loss_rise', 0):+.3f} | {r['final_weights']} ({' '.join(r['checks']) or 'not checked'}) | "
                  f"{r['minutes']} |", flush=True)
            (root / f"{name}-{variant}.json").write_text(json.dumps(r, indent=1, ensure_ascii=False))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
