"""Evaluation generation time per 100 prompts on the tiny GLM-4: batched (left padding, KV cache) against one
prompt at a time, in the same run, on the same prompts.

    .venv/bin/python benchmarks/eval_generation.py [--prompts 100] [--max_new_tokens 64] [--batch_size 16]

The base model is used because it never stops early: every prompt generates exactly max_new_tokens in both
modes, so both do the same work.
"""

import argparse
import time

import torch

from sftlab.data.convert import alpaca_to_messages
from sftlab.data.load import demo_data_path, read_source
from sftlab.infer.generate import SamplingArgs, generate_replies
from sftlab.model.load import load_for_inference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    rows = [r.row for r in read_source(str(demo_data_path()))]
    conversations = [alpaca_to_messages(rows[i % len(rows)])[:-1] for i in range(args.prompts)]
    model, tokenizer = load_for_inference(model="sftlab:tiny-glm4")
    greedy = SamplingArgs(max_new_tokens=args.max_new_tokens, temperature=0, repetition_penalty=1.0)
    generate_replies(model, tokenizer, conversations[:4], greedy, batch_size=4)  # warm-up
    timings = {}
    for name, batch_size in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
        start = time.perf_counter()
        replies = generate_replies(model, tokenizer, conversations, greedy, batch_size=batch_size)
        timings[name] = time.perf_counter() - start
        tokens = sum(r.new_tokens for r in replies)
        print(f"{name:16s} {timings[name] / args.prompts * 100:7.2f} s per 100 prompts   "
              f"{tokens / timings[name]:8.0f} new tokens/s")
    one, batched = timings.values()
    print(f"device: {model.device}, torch threads: {torch.get_num_threads()}, max_new_tokens {args.max_new_tokens}")
    print(f"ratio one-at-a-time / batched: {one / batched:.2f}x")


if __name__ == "__main__":
    main()
