"""Data pipeline throughput: sftlab's clean + tokenize, end to end, beside TRL's own preprocessing of the
same rows, in the same run. Each side runs in its own process, so each peak memory is its own.

    .venv/bin/python benchmarks/data_pipeline.py [--rows 50000]

Rows are Alpaca-like (instruction/input/output) with a length distribution like Alpaca-GPT4-zh: mean about
210 characters, a long tail to 3,000; a few percent are exact or near duplicates, and 1.5% are planted defects
of every kind sftlab rejects (broken JSON, invalid UTF-8, empty and boilerplate replies, malformed records, wrong
role order, over-long rows: benchmarks/dirty_data.py), as in real data. TRL, which has no cleaning, is given the
rows it can read at all (JSON objects with string fields); the others would stop it. Both sides use one process
per core (TRL: dataset_num_proc); TRL's time is its preprocessing alone (its trainer is built before the clock
starts). Interleaved, median of --repeats.
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from dirty_data import with_defects

MAX_LENGTH = 1024
CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
PUNCT = list("，。！？；：、") + ["\n"]
WORDS = "the model data train answer question example because first second then finally".split()


def text(rng: random.Random, n_chars: int) -> str:
    out = []
    while len(out) < n_chars:
        if rng.random() < 0.1:
            out.extend(" " + rng.choice(WORDS) + " ")
        else:
            out.append(rng.choice(CJK) if rng.random() > 0.08 else rng.choice(PUNCT))
    return "".join(out)[:n_chars]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rows and rng.random() < 0.03:  # exact or near duplicate of an earlier row
            twin = dict(rng.choice(rows))
            if rng.random() < 0.5:
                twin["output"] = twin["output"] + "。"
            rows.append(twin)
            continue
        total = min(3000, int(rng.lognormvariate(5.15, 0.6)))  # mean ~210, long tail, capped at 3,000
        prompt = max(4, int(total * rng.uniform(0.1, 0.4)))
        has_input = rng.random() < 0.35
        rows.append({"instruction": text(rng, prompt if not has_input else prompt // 2),
                     "input": text(rng, prompt // 2) if has_input else "",
                     "output": text(rng, max(4, total - prompt))})
    return rows


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_sftlab(path: str, queue) -> None:
    from sftlab.chat_format import ChatRenderer
    from sftlab.config import CleanArguments, DataArguments
    from sftlab.data.prepare import prepare_data
    from sftlab.model.load import load_tokenizer
    from sftlab.model.tiny import ensure_tiny_model

    renderer = ChatRenderer(load_tokenizer(ensure_tiny_model()), MAX_LENGTH)
    os.environ["SFTLAB_HOME"] = tempfile.mkdtemp()  # the tiny model is loaded: a fresh cache, so it prepares
    start = time.perf_counter()
    data = prepare_data(DataArguments(data_files=[path], test_size=0.0), CleanArguments(near_dedup=True), renderer)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "peak_mb": peak_mb(), "kept": data.report["kept"],
               "rows_read": data.report["rows_read"], "reasons": data.report["reasons"]})


def run_trl(path: str, queue) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from sftlab.data.convert import alpaca_to_messages
    from sftlab.model.load import load_tokenizer
    from sftlab.model.tiny import ensure_tiny_model

    tokenizer = load_tokenizer(ensure_tiny_model())
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model())
    # as many processes as sftlab uses (one per core); the trainer is built before the clock starts
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=MAX_LENGTH, report_to="none", use_cpu=True,
                     dataset_num_proc=os.cpu_count())
    hello = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    warmup = Dataset.from_list([{"messages": hello}])
    trainer = SFTTrainer(model=model, args=args, train_dataset=warmup, processing_class=tokenizer)
    start = time.perf_counter()
    # TRL's path for the same job: the file's rows -> conversations -> its chat-template tokenization -> truncation
    rows = readable_rows(path)
    dataset = Dataset.from_list([{"messages": alpaca_to_messages(r)} for r in rows])
    prepared = trainer._prepare_dataset(dataset, tokenizer, args, False, None, "benchmark")
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "peak_mb": peak_mb(), "kept": len(prepared)})


def readable_rows(path: str) -> list[dict]:
    """The rows a loader without cleaning can take at all: valid UTF-8 and JSON, Alpaca fields all strings."""
    rows = []
    for raw in Path(path).read_bytes().splitlines():
        try:
            row = json.loads(raw.decode("utf-8"))
            row["instruction"].encode("utf-8")  # a lone surrogate fails here
        except (UnicodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError):
            continue
        if all(isinstance(row.get(k), str) for k in ("instruction", "input", "output")):
            rows.append(row)
    return rows


def measure(target, path: str) -> dict:
    queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=target, args=(path, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = make_rows(args.rows)
    chars = [len(r["instruction"]) + len(r["input"]) + len(r["output"]) for r in rows]
    lines = with_defects(rows, MAX_LENGTH)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "alpaca_like.jsonl")
        Path(path).write_bytes(b"\n".join(lines) + b"\n")
        print(f"{len(lines)} rows ({args.rows} generated, {len(lines) - args.rows} planted defects), mean "
              f"{sum(chars) / len(chars):.0f} chars, max {max(chars)}; tokenizer: sftlab:tiny-glm4, max_length "
              f"{MAX_LENGTH}; TRL is given the {len(readable_rows(path))} rows it can read")
        runs = {"sftlab": [], "trl": []}
        for repeat in range(args.repeats):  # interleaved: sftlab, TRL, sftlab, TRL, ...
            runs["sftlab"].append(measure(run_sftlab, path))
            runs["trl"].append(measure(run_trl, path))
            print(f"  round {repeat + 1}: sftlab {runs['sftlab'][-1]['seconds']:.1f} s, "
                  f"TRL {runs['trl'][-1]['seconds']:.1f} s", flush=True)
    print(f"median of {args.repeats}, each side {os.cpu_count()} processes:")
    medians = {}
    for side, name in (("sftlab", "sftlab clean+tokenize (near-dedup on)"), ("trl", "TRL preprocessing only")):
        seconds = statistics.median(r["seconds"] for r in runs[side])
        peak = statistics.median(r["peak_mb"] for r in runs[side])
        medians[side] = seconds
        print(f"{name:40s} {len(lines) / seconds:8.0f} rows/s  {seconds:6.1f} s  peak {peak:6.0f} MB  "
              f"kept {runs[side][0]['kept']}")
    report = runs["sftlab"][0]
    print(f"sftlab reasons: {report['reasons']}")
    print(f"sftlab rows read {report['rows_read']} = kept {report['kept']} + rejected "
          f"{sum(report['reasons'].values())}")
    print(f"ratio sftlab/TRL rows/s: {medians['trl'] / medians['sftlab']:.2f}x")


if __name__ == "__main__":
    main()
