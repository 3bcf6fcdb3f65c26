"""Training throughput on CPU: the tutorial's TRL setup against sftlab's, in one run, interleaved.

    .venv/bin/python benchmarks/train_throughput.py [--rows 2000] [--repeats 3] [--variants a,b,c,d,e]
    .venv/bin/python benchmarks/train_throughput.py --model sftlab:smollm2-135m --rows 240 --variants a,b,e

The tiny GLM-4 (`sftlab:tiny-glm4`; --model: another, such as the real SmolLM2-135M: 30 layers, a 49,152-token
vocabulary, tied embeddings, where the LM head is a larger share of the work), LoRA r=8 / alpha 32 / dropout 0.1 on
q/k/v, one epoch over generated Alpaca-like rows whose rendered length averages about 150 tokens with a long tail
to 1,000, and 1.5% planted defects of every kind sftlab rejects (benchmarks/dirty_data.py), as in real data. sftlab
reads that file and cleans it; the tutorial, which has no cleaning and would stop at the first unreadable line, is
given the rows it can read (it then trains on the empty, boilerplate and duplicate ones, as it did):

  (a) the tutorial: TRL's SFTTrainer directly (not sftlab), text rendered by a formatting function, batch 2
      padded to its longest sample, loss on every token, TRL's defaults (activation checkpointing on);
  (b) sftlab with configs/glm4-9b-lora.yaml as shipped (its defaults on CPU: padding-free rows through
      sdpa_varlen, max_tokens_per_batch auto = 2,048-token micro-batches on CPU, LM head on supervised positions
      only, activation checkpointing on);
  (c) sftlab with those three set explicitly: --padding_free true --max_tokens_per_batch 8192
      --supervised_head true;
  (d) as (c) but padded, length-grouped micro-batches (--padding_free false: the choice on a kernel without
      varlen support);
  (e) as (c) without activation checkpointing (the speed/memory trade-off);
  (f) as (c) with sdpa's block-diagonal mask instead of sdpa_varlen (--attn_implementation sdpa): padding-free
      without a varlen kernel, quadratic in the row (run it with --variants a,f; not in the default set);
  (g) as (b) with 8,192-token micro-batches (what auto picks on a GPU): on CPU the activations of a micro-batch
      that large leave the caches (run it with --variants a,b,g).

Each run is its own process (so each peak RSS is its own). Printed per variant: median of the repeats of real
(non-padding) tokens/s over the training loop (TRL's train_runtime: model loading and data preparation are
outside it), samples/s, the padding share of the positions computed, peak RSS, and the ratio to (a).
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import readable_rows  # noqa: E402  what a loader without cleaning can read
from dirty_data import with_defects  # noqa: E402  the same planted defects as every benchmark

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "a": "tutorial: TRL SFTTrainer, batch 2 padded, loss on all tokens",
    "b": "sftlab, configs/glm4-9b-lora.yaml as shipped (auto: 2k-token micro-batches on CPU)",
    "c": "sftlab, padding-free + 8k-token budget + supervised head",
    "d": "sftlab, as (c) but padded length-grouped",
    "e": "sftlab, as (c) without activation checkpointing",
    "f": "sftlab, as (c) on sdpa's block-diagonal mask",
    "g": "sftlab, as (b) with 8k-token micro-batches (auto's GPU choice)",
}
FAST = ["--padding_free", "true", "--max_tokens_per_batch", "8192", "--supervised_head", "true"]


def phrase_pool(tokenizer) -> list[tuple[str, int]]:
    """Pieces of the demo data's text, each with its token count, to build rows of a chosen token length."""
    from importlib import resources

    rows = json.loads(resources.files("sftlab.data.demo").joinpath("alpaca_demo.json").read_text("utf-8"))
    pieces = set()
    for row in rows:
        for text in (row["instruction"], row["output"]):
            pieces.update(p.strip() for p in text.replace("。", "。|").replace(". ", ".|").split("|") if p.strip())
    return [(p, len(tokenizer.encode(p, add_special_tokens=False))) for p in sorted(pieces)]


def text_of(rng: random.Random, pool, tokens: int) -> str:
    out, count = [], 0
    while count < tokens:
        piece, n = rng.choice(pool)
        out.append(piece)
        count += n
    return "".join(out)


def make_rows(n: int, tokenizer, seed: int = 0) -> list[dict]:
    """Alpaca-like rows: total content tokens lognormal (median ~110, mean ~140), capped at 1,000."""
    rng, pool = random.Random(seed), phrase_pool(tokenizer)
    rows = []
    for _ in range(n):
        total = min(1000, max(8, int(rng.lognormvariate(4.7, 0.65))))
        prompt = max(3, int(total * rng.uniform(0.15, 0.4)))
        has_input = rng.random() < 0.35
        rows.append({"instruction": text_of(rng, pool, prompt // 2 if has_input else prompt),
                     "input": text_of(rng, pool, prompt // 2) if has_input else "",
                     "output": text_of(rng, pool, total - prompt)})
    return rows


class Counter:
    """Counts what the collator hands the model: samples, real tokens and all positions computed."""
    samples = real = positions = 0

    @classmethod
    def install(cls):
        from trl.trainer import sft_trainer

        original = sft_trainer.DataCollatorForLanguageModeling.torch_call

        def counted(self, examples):
            batch = original(self, examples)
            cls.samples += len(examples)
            cls.real += sum(len(e["input_ids"]) for e in examples)
            cls.positions += batch["input_ids"].numel()
            return batch

        sft_trainer.DataCollatorForLanguageModeling.torch_call = counted


def run_tutorial(data_file: str, out: str, model_name: str) -> float:
    """The tutorial's training script, as it ran (TRL 1.x defaults where it set nothing)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from sftlab.model.load import load_tokenizer, resolve_model_path

    path = resolve_model_path(model_name)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    raw = datasets.load_dataset("json", data_files=data_file)["train"].train_test_split(0.05, seed=42)

    def formatting_func(example):
        prompt = example["instruction"] + ("\n\n" + example["input"] if example["input"] else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": example["output"]}]
        return tokenizer.apply_chat_template(messages, tokenize=False)

    args = SFTConfig(output_dir=out, num_train_epochs=1, per_device_train_batch_size=2, learning_rate=5e-4,
                     bf16=False, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=50,
                     seed=42, dataloader_pin_memory=False, disable_tqdm=True)
    peft_config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj"],
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=raw["train"], processing_class=tokenizer,
                         peft_config=peft_config, formatting_func=formatting_func)
    return trainer.train().metrics["train_runtime"]


def run_sftlab(data_file: str, out: str, variant: str, model_name: str) -> float:
    from sftlab.train.config import parse_args
    from sftlab.train.sft import train

    extra = {"b": [], "c": FAST, "d": FAST[2:] + ["--padding_free", "false"],
             "e": FAST + ["--activation_checkpointing", "false"],
             "f": FAST + ["--attn_implementation", "sdpa"], "g": ["--max_tokens_per_batch", "8192"]}[variant]
    args = parse_args([
        "--config", str(REPO / "configs/glm4-9b-lora.yaml"), "--model_name_or_path", model_name,
        "--dtype", "float32", "--bf16", "false", "--bf16_full_eval", "false", "--data_files", data_file,
        "--output_dir", out, "--report_to", "none", "--num_train_epochs", "1", "--max_length", "1024",
        "--eval_strategy", "no", "--save_strategy", "no", "--final_eval_samples", "0",
        "--probe_prompts", "hi", "--probe_max_new_tokens", "1", "--disable_tqdm", "true", *extra,
    ])
    train(*args)
    logs = [json.loads(line) for line in (Path(out) / "trainer_log.jsonl").read_text().splitlines()]
    return next(r["train_runtime"] for r in reversed(logs) if "train_runtime" in r)


def worker(variant: str, data_file: str, model_name: str) -> None:
    Counter.install()
    with tempfile.TemporaryDirectory() as out:
        seconds = (run_tutorial(tutorial_file(data_file), out, model_name) if variant == "a"
                   else run_sftlab(data_file, out + "/run", variant, model_name))
    result = dict(variant=variant, seconds=seconds, samples=Counter.samples, real=Counter.real,
                  positions=Counter.positions, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(result))


def tutorial_file(data_file: str) -> str:
    return data_file.replace(".jsonl", ".readable.json")


def run_once(variant: str, data_file: str, env: dict, model_name: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", variant, "--data", data_file, "--model", model_name],
                          capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="a,b,c,d,e")
    parser.add_argument("--model", default="sftlab:tiny-glm4", help="sftlab:tiny-glm4 or sftlab:smollm2-135m (the "
                        "real one: pip install 'sftlab[real]'), or a model folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.data, args.model)

    from sftlab.model.load import load_tokenizer, resolve_model_path

    variants = args.variants.split(",")
    home = os.environ.get("SFTLAB_HOME") or tempfile.mkdtemp(prefix="sftlab-bench-")
    env = {**os.environ, "SFTLAB_HOME": home, "SWANLAB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update(SFTLAB_HOME=home)
    tokenizer = load_tokenizer(resolve_model_path(args.model))  # builds an embedded model once, before the runs
    work = tempfile.mkdtemp(prefix="throughput-", dir=home)
    rows = make_rows(args.rows, tokenizer)
    data_file = str(Path(work) / "alpaca_like.jsonl")
    Path(data_file).write_bytes(b"\n".join(with_defects(rows, 1024)) + b"\n")
    Path(tutorial_file(data_file)).write_text(json.dumps(readable_rows(data_file), ensure_ascii=False), "utf-8")
    lengths = [len(tokenizer.apply_chat_template(
        [{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")},
         {"role": "assistant", "content": r["output"]}], tokenize=True, return_dict=False)) for r in rows]
    print(f"{args.model}: {args.rows} rows; rendered tokens mean {statistics.mean(lengths):.0f}, median "
          f"{statistics.median(lengths):.0f}, p99 {sorted(lengths)[int(0.99 * len(lengths))]}, max {max(lengths)}; "
          f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}")
    runs = {v: [] for v in variants}
    start = time.time()
    for repeat in range(args.repeats):  # interleaved: a b c d a b c d ...
        for v in variants:
            r = run_once(v, data_file, env, args.model)
            runs[v].append(r)
            print(f"  round {repeat + 1} ({v}): {r['real'] / r['seconds']:,.0f} tokens/s, {r['seconds']:.1f} s",
                  flush=True)
    print(f"\nmedian of {args.repeats} (wall {time.time() - start:.0f} s; "
          f"load average after: {os.getloadavg()[0]:.2f})")
    print("| variant | real tokens/s | samples/s | padding | peak RSS | vs (a) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    baseline = statistics.median(r["real"] / r["seconds"] for r in runs[variants[0]])
    for v in variants:
        speed = statistics.median(r["real"] / r["seconds"] for r in runs[v])
        samples = statistics.median(r["samples"] / r["seconds"] for r in runs[v])
        padding = statistics.median(1 - r["real"] / r["positions"] for r in runs[v])
        rss = statistics.median(r["peak_rss_mb"] for r in runs[v])
        print(f"| ({v}) {VARIANTS[v]} | {speed:,.0f} | {samples:,.1f} | {padding:.1%} | {rss:,.0f} MB | "
              f"{speed / baseline:.2f}x |")


if __name__ == "__main__":
    main()
