"""Peak memory of `sftlab train`'s data preparation: clean + tokenize + split + cache, then the datasets the
trainer is given, on generated Alpaca-like rows with 1.5% planted defects of every kind (benchmarks/dirty_data.py).
Each phase runs in its own process, so each peak RSS is its own:

    .venv/bin/python benchmarks/prepare_memory.py [--rows 200000]

  fresh:  an empty cache: the whole stage, then the train and held-out datasets as train() builds them;
  cached: a second run, which reads the prepared data from the cache.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import make_rows  # noqa: E402  the same generated rows as the data benchmark
from dirty_data import with_defects  # noqa: E402  and the same planted defects


def worker(data_file: str) -> None:
    from datasets import Dataset

    from sftlab.chat_format import ChatRenderer
    from sftlab.config import CleanArguments, DataArguments
    from sftlab.data.prepare import prepare_data
    from sftlab.model.load import load_tokenizer, resolve_model_path

    renderer = ChatRenderer(load_tokenizer(resolve_model_path("sftlab:tiny-glm4")), 1024)
    started = time.perf_counter()
    data = prepare_data(DataArguments(data_files=[data_file]), CleanArguments(), renderer)
    # what train() then hands the trainer and the batch sampler
    train = data.train if isinstance(data.train, Dataset) else Dataset.from_list(data.train)
    test = data.test if isinstance(data.test, Dataset) else Dataset.from_list(data.test)
    lengths = train["length"] if "length" in train.column_names else [len(ids) for ids in train["input_ids"]]
    result = dict(seconds=time.perf_counter() - started, train=len(train), test=len(test), tokens=sum(lengths),
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(result))


def run(data_file: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", data_file], capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(proc.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    home = tempfile.mkdtemp(prefix="sftlab-prepare-")
    data_file = str(Path(home) / "rows.jsonl")
    with open(data_file, "wb") as f:
        for line in with_defects(make_rows(args.rows), 1024):
            f.write(line + b"\n")
    env = {**os.environ, "SFTLAB_HOME": home, "HF_HUB_OFFLINE": "1"}
    print(f"{args.rows:,} rows ({os.path.getsize(data_file) / 2**20:.0f} MB of JSON Lines); {os.cpu_count()} CPUs")
    for phase in ("fresh", "cached"):
        r = run(data_file, env)
        print(f"{phase:7s} peak RSS {r['peak_rss_mb']:,.0f} MB, {r['seconds']:.1f} s "
              f"({r['train']:,} train + {r['test']:,} held out, {r['tokens']:,} train tokens)", flush=True)
    cache = Path(home) / "datasets"
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    print(f"cache on disk: {size / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
