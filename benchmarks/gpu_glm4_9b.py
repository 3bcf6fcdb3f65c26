"""GLM-4-9B LoRA training speed on one GPU: the tutorial's configuration against sftlab's best, in one run.

    python benchmarks/gpu_glm4_9b.py                 # one CUDA GPU, bf16, GLM-4-9B shapes at random init
    python benchmarks/gpu_glm4_9b.py --tiny          # the same code path on CPU, scaled down (tested)

No weights are needed: the model is built from glm-4-9b-hf's published config on the meta device, then
materialized on the device with random weights. Samples are random token ids with the Alpaca-like length
distribution of benchmarks/train_throughput.py (mean about 150 tokens, long tail to 1,000), prompt masked.

  tutorial: 2 samples per micro-batch padded to the longest, full-vocabulary logits and loss on every
            position (transformers' own loss), sdpa attention, activation checkpointing on (TRL's default);
  sftlab:   micro-batches of up to 8,192 tokens grouped by length; padding-free rows with FlashAttention-2
            where flash_attn is installed, else with sftlab's sdpa_varlen (sftlab's own defaults); the LM head
            and loss on supervised positions only, in chunks; with and without activation checkpointing.

Each for LoRA r=8 on q/k/v (the tutorial's) and r=16 on all linear layers. Printed: real tokens/s, MFU
(35.9 GFLOP per token, 52.5 with activation checkpointing, against 989 TFLOP/s dense bf16), peak memory, and
the ratio to the tutorial's configuration with the same LoRA.
"""

import argparse
import random
import statistics
import time

import torch

GLM4_9B = dict(vocab_size=151552, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
               num_key_value_heads=2, head_dim=128, intermediate_size=13696, attention_bias=True,
               partial_rotary_factor=0.5, rms_norm_eps=1.5625e-07, rope_theta=10000.0, tie_word_embeddings=False,
               max_position_embeddings=8192, pad_token_id=151329)
TINY = dict(GLM4_9B, vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=32,
            intermediate_size=320, pad_token_id=0)
# GLM-4-9B LoRA at 512 tokens, per token: forward (2N) and the backward's input gradients (2N; frozen weights
# need no weight gradients) for N of about 9B, plus attention; activation checkpointing adds a second forward
GFLOP_PER_TOKEN = {False: 35.9, True: 52.5}
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16


def build_model(arch: dict, device: str, dtype, attention: str):
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(**arch, attn_implementation=attention)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: 9.4B parameters never exist in fp32
    try:
        with torch.device("meta"):
            model = GlmForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    # the rotary inv_freq buffer is computed, not stored: to_empty left it uninitialized, so build it again
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model


def samples(n: int, vocab: int, seed: int = 0, max_len: int = 1024) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = min(max_len, max(8, int(rng.lognormvariate(4.75, 0.65))))
        prompt = max(3, int(length * rng.uniform(0.15, 0.4)))
        ids = [rng.randrange(vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def micro_batches(data, fast: bool, padding_free: bool, max_tokens: int, pad_id: int):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sftlab.train.batching import fixed_size_batches, token_budget_batches

    lengths = [len(s["input_ids"]) for s in data]
    groups = (token_budget_batches(lengths, max_tokens, padding_free, seed=0) if fast
              else fixed_size_batches(len(data), 2, seed=0))
    collate = DataCollatorForLanguageModeling(pad_id, padding_free=padding_free)
    return [(collate([data[i] for i in g]), sum(lengths[i] for i in g)) for g in groups]


def run(arch, device, dtype, lora_targets, lora_r, fast, checkpointing, warmup, max_tokens, data):
    """One epoch over `data`; the clock starts after `warmup` micro-batches."""
    from peft import LoraConfig, get_peft_model

    from sftlab.train.batching import resolve_padding_free, training_attention
    from sftlab.train.loss import add_supervised_lm_head

    # sftlab's own choice: FlashAttention-2 where flash_attn is installed, else sdpa_varlen; padding-free with either
    attention = (training_attention(None, None) if fast else None) or "sdpa"
    padding_free = fast and resolve_padding_free(None, attention, verbose=False)
    model = build_model(arch, device, dtype, attention)
    if fast:
        add_supervised_lm_head(model)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.1,
                                             target_modules=lora_targets, task_type="CAUSAL_LM"))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = micro_batches(data, fast, padding_free, max_tokens, 0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, start = 0, time.perf_counter()
    for step, (batch, real) in enumerate(batches):
        if step == min(warmup, len(batches) - 1):
            _sync(device)
            tokens, start = 0, time.perf_counter()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = model(**batch, use_cache=False, **({"fused_lm_head": True} if fast else {})).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += real
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": tokens / seconds, "peak_gib": peak, "attention": attention,
            "padding_free": padding_free}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="scaled-down model on CPU (fp32)")
    parser.add_argument("--warmup", type=int, default=2, help="micro-batches run before the clock starts")
    parser.add_argument("--samples", type=int, default=None, help="samples per epoch (600; --tiny: 200)")
    parser.add_argument("--max_tokens_per_batch", type=int, default=None, help="sftlab's budget (8192; --tiny: 1024)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_glm4_9b.py needs a CUDA GPU; --tiny runs the same code path on CPU")
    device, dtype, arch = ("cpu", torch.float32, TINY) if args.tiny else ("cuda", torch.bfloat16, GLM4_9B)
    data = samples(args.samples or (200 if args.tiny else 600), arch["vocab_size"])
    args.max_tokens_per_batch = args.max_tokens_per_batch or (1024 if args.tiny else 8192)
    print(f"{'tiny (CPU)' if args.tiny else torch.cuda.get_device_name()}: one epoch of {len(data)} samples, mean "
          f"{statistics.mean(len(s['input_ids']) for s in data):.0f} tokens, per configuration; the clock starts "
          f"after {args.warmup} micro-batches")
    rows = []
    loras = (("r=8 q/k/v", ["q_proj", "k_proj", "v_proj"], 8), ("r=16 all-linear", "all-linear", 16))
    for lora_name, targets, r in loras:
        # the tutorial's steps are small: a third of the samples (same distribution) keeps its run as long as ours
        tutorial = run(arch, device, dtype, targets, r, False, True, args.warmup, args.max_tokens_per_batch,
                       data[: max(len(data) // 3, 8)])
        rows.append((lora_name, "tutorial (batch 2 padded, full logits, ckpt)", True, tutorial, tutorial))
        for checkpointing in (True, False):
            best = run(arch, device, dtype, targets, r, True, checkpointing, args.warmup, args.max_tokens_per_batch,
                       data)
            name = (f"sftlab ({'padding-free' if best['padding_free'] else 'length-grouped'} {best['attention']}, "
                    f"{args.max_tokens_per_batch} tokens, supervised head, {'ckpt' if checkpointing else 'no ckpt'})")
            rows.append((lora_name, name, checkpointing, best, tutorial))
    print("\n| LoRA | configuration | tokens/s | MFU | peak memory | vs tutorial |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for lora_name, name, checkpointing, result, tutorial in rows:
        mfu = result["tokens_per_s"] * GFLOP_PER_TOKEN[checkpointing] * 1e9 / (PEAK_TFLOPS * 1e12)
        mfu, peak = ("n/a", "n/a") if args.tiny else (f"{mfu:.1%}", f"{result['peak_gib']:.1f} GiB")
        print(f"| {lora_name} | {name} | {result['tokens_per_s']:,.0f} | {mfu} | {peak} | "
              f"{result['tokens_per_s'] / tutorial['tokens_per_s']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
