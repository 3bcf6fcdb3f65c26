"""`sftlab estimate --config FILE`: what a training run will cost, before it is launched.

From the cleaned, tokenized data (the same cached stage as `sftlab train`): tokens x epochs, micro-batches and
optimizer steps; a memory estimate per GPU (weights in their dtype or 4-bit, LoRA or full trainable weights,
their gradients and AdamW states, activations with and without activation checkpointing, logits with the plain
and the chunked loss); and a time estimate from a 20-step probe where the hardware allows it.

The arithmetic counts the tensors autograd keeps per token and layer for the model's own shapes (read from its
config on the meta device: no weights are loaded). tests/train/test_estimate.py checks it against the bytes
autograd really saves on the tiny model.
"""

import contextlib
import io
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import TrlParser

from sftlab.errors import UserError
from sftlab.run_dir import TRAINER_LOG, read_jsonl
from sftlab.train.config import TRAIN_ARGUMENTS, batch_setup, budget_line, lora_config

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
NF4_BITS = 4.127  # 4-bit weights + double-quantized absmax per 64 weights (QLoRA paper)
TOKEN_CHUNK, VOCAB_CHUNK = 4096, 32768  # TRL's chunked head tile


@dataclass
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    q_dim: int
    kv_dim: int
    vocab: int


def model_shapes(config) -> Shapes:
    config = config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shapes(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                  config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, config.vocab_size)


def activation_elements_per_token(s: Shapes, lora_modules_per_layer: int, lora_r: int, checkpointing: bool) -> float:
    """Elements autograd keeps per token for the backward pass, over the whole decoder.

    One layer keeps: the two norms' inputs and outputs (4 x hidden), the q/k/v outputs and the rotated q and k
    (q, k, v, rotated q, rotated k), the attention output fed to o_proj (q), the gate_up output and
    the activation's input and output (3 x intermediate), and per LoRA module its dropped-out input (hidden)
    and the A output (r). With activation checkpointing only each layer's input is kept, plus one layer's
    set while that layer is recomputed."""
    attention = 2 * s.q_dim + 3 * s.kv_dim + s.q_dim
    per_layer = 4 * s.hidden + attention + 3 * s.intermediate + lora_modules_per_layer * (s.hidden + lora_r)
    final_norm = 2 * s.hidden  # its input and output
    if checkpointing:
        return s.layers * s.hidden + final_norm + per_layer
    return s.layers * per_layer + final_norm


def logits_bytes(tokens: int, supervised: int, vocab: int, hidden: int, compute_bytes: int, chunked: bool,
                 head_trainable: bool) -> int:
    """The LM head's own memory: full logits in fp32 and their gradient (plain), or one tile and, when the
    head trains, an fp32 gradient accumulator (chunked)."""
    if not chunked:
        return tokens * vocab * (compute_bytes + 4 + 4)  # logits, their fp32 upcast, and its gradient
    tile = min(supervised, TOKEN_CHUNK) * min(vocab, VOCAB_CHUNK) * compute_bytes
    return tile + (vocab * hidden * 4 if head_trainable else 0)


def parameter_counts(model_path, model_args) -> tuple[int, int, int, int, object]:
    """(all weights, linear weights quantizable to 4 bits, trainable, LoRA modules per layer, config),
    counted on the meta device."""
    from sftlab.model.load import meta_model

    model = meta_model(model_path)
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    if not model_args.use_peft:
        return total, linear, total, 0, config
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(model_args))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora_modules = sum(1 for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and ".layers.0." in n)
    return total, linear, trainable, lora_modules, config


@dataclass
class Estimate:
    lines: list[tuple[str, str]]
    memory_gib: dict  # name -> GiB
    total_gib: float

    def text(self) -> str:
        width = max(len(k) for k, _ in self.lines)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.lines)


def estimate(model_args, data_args, clean_args, train_args, probe: bool | None = None) -> Estimate:
    from sftlab.chat_format import ChatRenderer
    from sftlab.data.prepare import prepare_data
    from sftlab.model.load import load_tokenizer, resolve_model_path
    from sftlab.train.batching import resolve_padding_free, training_attention

    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path, train_args.trust_remote_code)
    data = prepare_data(data_args, clean_args, ChatRenderer(tokenizer, train_args.max_length, data_args.overflow))
    if not len(data.train):
        raise UserError(f"no training samples left ({data.summary()})")
    lengths, supervised = data.train["length"], data.train["num_supervised"]
    attention = training_attention(model_args.attn_implementation, train_args.padding_free, model_args.dtype)
    padding_free = resolve_padding_free(train_args.padding_free, attention, verbose=False)
    _, batches, plan = batch_setup(train_args, lengths, padding_free)
    epochs = train_args.num_train_epochs
    steps = train_args.max_steps if train_args.max_steps > 0 else math.ceil(plan.optimizer_steps_per_epoch * epochs)
    largest = max(batches, key=lambda b: (len(b) * max(lengths[i] for i in b)) if not padding_free
                  else sum(lengths[i] for i in b))
    positions = (sum(lengths[i] for i in largest) if padding_free else len(largest) * max(lengths[i] for i in largest))
    largest_supervised = sum(supervised[i] for i in largest)
    total, _, trainable, _, _ = counts = parameter_counts(model_path, model_args)
    memory, memory_lines = memory_estimate(model_args, train_args, counts, positions, largest_supervised)
    lines = [
        ("data", data.summary().removeprefix("data: ")),
        ("tokens", f"{sum(lengths):,} per epoch x {epochs:g} epochs = {sum(lengths) * epochs:,.0f}"
                   if train_args.max_steps <= 0 else f"{sum(lengths):,} per epoch; the budget below sees "
                   f"~{steps * plan.tokens_per_step:,.0f} (max_steps {steps})"),
        ("batches", f"{'padding-free' if padding_free else 'padded'}, {plan.summary()}"),
        ("optimizer steps", f"{steps:,}"),
        ("budget", budget_line(train_args, plan, len(lengths)).removeprefix("budget: ")),
        ("replay", replay_estimate(train_args, len(lengths))),
        ("retention at saves", retention_estimate(train_args, steps)),
        ("largest micro-batch", f"{len(largest)} samples, {positions:,} positions, {largest_supervised:,} supervised"),
        ("parameters", f"{total:,} ({'4-bit NF4' if model_args.load_in_4bit else model_args.dtype}), "
                       f"{trainable:,} trainable"),
        *memory_lines,
        ("time", time_estimate(model_args, data_args, clean_args, train_args, total, steps, probe)),
    ]
    return Estimate(lines, memory, sum(memory.values()))


def memory_estimate(model_args, train_args, counts: tuple, positions: int, supervised: int
                    ) -> tuple[dict, list[tuple[str, str]]]:
    """GiB per device by kind (weights, trainable state, activations, logits) for the largest micro-batch, and the
    lines that show them with the alternatives (activation checkpointing on and off, chunked and plain head)."""
    total, linear, trainable, lora_modules, config = counts
    shapes = model_shapes(config)
    weight_bytes = BYTES[model_args.dtype]
    weights = linear * NF4_BITS / 8 + (total - linear) * 2 if model_args.load_in_4bit else total * weight_bytes
    trainable_bytes = 4 if weight_bytes == 4 else 2
    optimizer = trainable * (trainable_bytes + 8)  # gradients + AdamW's two fp32 moments
    compute_bytes = 2 if (train_args.bf16 or train_args.fp16) else weight_bytes
    act = {ckpt: activation_elements_per_token(shapes, lora_modules, model_args.lora_r, ckpt) * positions *
           compute_bytes for ckpt in (True, False)}
    head_trainable = not model_args.use_peft or "lm_head" in (model_args.lora_modules_to_save or [])
    logits = {chunked: logits_bytes(positions, supervised, shapes.vocab, shapes.hidden, compute_bytes, chunked,
                                    head_trainable) for chunked in (True, False)}
    checkpointing, chunked, gib = bool(train_args.activation_checkpointing), bool(train_args.supervised_head), 2**30
    memory = {"weights": weights / gib,
              "trainable + gradients + AdamW": (trainable * trainable_bytes + optimizer) / gib,
              "activations": act[checkpointing] / gib, "logits": logits[chunked] / gib}
    return memory, [
        ("memory: weights", size(weights)),
        ("memory: trainable + grads + AdamW", size(trainable * trainable_bytes + optimizer)),
        ("memory: activations", f"{size(act[True])} with activation checkpointing, {size(act[False])} without "
                                f"(this config: {'on' if checkpointing else 'off'})"),
        ("memory: logits", f"{size(logits[True])} chunked on supervised positions, {size(logits[False])} plain "
                           f"(this config: {'chunked' if chunked else 'plain'})"),
        ("memory: total per device", f"{size(sum(memory.values()) * gib)} (+ the framework's own: about 1 GiB on a "
                                     "GPU)"),
        ("memory: DPO's reference", dpo_reference_line(model_args, weights)),
    ]


def replay_estimate(train_args, train_rows: int) -> str:
    """What replay adds: rows, and the base's generation (once per base and prompt set: cached)."""
    if not train_args.replay:
        return "off (replay: true mixes the base's own answers to general prompts in)"
    from sftlab.train.replay import read_prompts

    prompts = len(read_prompts(train_args.replay_prompts))
    wanted = round(train_args.replay_ratio * train_rows)
    return (f"+{wanted} training rows (ratio {train_args.replay_ratio:g}; up to the replies that stop), from the "
            f"base's greedy replies to {prompts} prompts, up to {train_args.replay_max_new_tokens} new tokens each: "
            f"{prompts * train_args.replay_max_new_tokens:,} generated tokens at most, once per base (cached); "
            "memory: the model loaded once more before training, freed before it trains")


def retention_estimate(train_args, steps: int) -> str:
    """What the retention check at every save costs: generation and scoring, no memory beyond a KV cache."""
    if not train_args.retention_at_saves:
        return "off (retention_at_saves: true checks retention at every save and keeps the best checkpoint)"
    from sftlab.eval.retention import MAX_NEW_TOKENS, shipped_probes

    # as transformers reads a share: every ceil(share x steps) steps
    save_every = math.ceil(train_args.save_steps * steps) if train_args.save_steps < 1 else train_args.save_steps
    saves = max(1, math.floor(steps / max(1, int(save_every))))
    probes = len(shipped_probes())
    return (f"{saves} saves x ({probes} probes, up to {MAX_NEW_TOKENS} greedy new tokens each, batched 16, + one "
            f"scoring pass), and once for the base before training; memory: a KV cache of 16 short prompts "
            f"(a few MB; 9B: ~50 MB in bf16)")


def dpo_reference_line(model_args, weights: float) -> str:
    """What `sftlab dpo` with this model adds for its reference model (the policy before tuning)."""
    if model_args.use_peft:
        return ("+0 with LoRA (sftlab dpo scores the reference with the adapter disabled: no copy; from an SFT "
                "LoRA run, a frozen copy of its adapter: the adapter's size); a pair is two rows, so count a "
                "micro-batch's tokens for both replies")
    return (f"+{size(weights)} in full fine-tuning (a frozen copy of the weights; +0 with precompute_ref_log_probs, "
            "which scores the pairs with the policy before it trains); a pair is two rows")


def size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def time_estimate(model_args, data_args, clean_args, train_args, total_params: int, steps: int,
                  probe: bool | None) -> str:
    """Seconds per step from a 20-step probe run, times the steps; only where a probe finishes in reasonable
    time (a GPU, or a model under 100M parameters on CPU)."""
    can_probe = torch.cuda.is_available() or total_params < 100_000_000
    if probe is False or not can_probe:
        return ("not probed: a model of this size on CPU would take hours to probe; run on the GPU to time it"
                if not can_probe else "not probed (--probe false)")
    import dataclasses

    from sftlab.train.sft import train

    probe_steps = min(20, steps)
    with tempfile.TemporaryDirectory() as out:
        probe_args = dataclasses.replace(train_args, output_dir=out, max_steps=probe_steps, save_strategy="no",
                                         eval_strategy="no", report_to="none", final_eval_samples=0, resume=False,
                                         logging_steps=probe_steps, disable_tqdm=True)
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the probe's own training output is not the answer
            train(model_args, data_args, clean_args, probe_args)
        runtime = next(r["train_runtime"] for r in reversed(read_jsonl(Path(out) / TRAINER_LOG))
                       if "train_runtime" in r)
        seconds_per_step = runtime / probe_steps
        overhead = time.perf_counter() - started - runtime
    return (f"{seconds_per_step:.3f} s per step from a {probe_steps}-step probe -> about "
            f"{seconds_per_step * steps / 60:.1f} min for {steps:,} steps (+ {overhead:.0f} s to load and prepare)")


@dataclass
class EstimateArguments:
    probe: bool | None = field(default=None, metadata={
        "help": "Time a 20-step probe run. None: where it finishes in reasonable time (a GPU, or a model under 100M "
                "parameters on CPU); false: never."})


def run(model_args, data_args, clean_args, train_args, estimate_args: EstimateArguments) -> int:
    print(estimate(model_args, data_args, clean_args, train_args, probe=estimate_args.probe).text())
    return 0


ARGUMENTS, PARSER = (*TRAIN_ARGUMENTS, EstimateArguments), TrlParser  # `sftlab estimate`'s (cli.py parses them)
