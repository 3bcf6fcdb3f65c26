"""`sftlab train`: the tutorial's TRL SFT script, with its defects fixed. Only train/ imports trl (here and loss.py).

Fixes over the tutorial, whose script had these defects: the assistant turn is followed by a supervised terminator and
the prompt is masked (one renderer, chat_format.py); max_length is TRL's real field; `[gMASK]<sop>` appears
once; the split is seeded; probes run in eval mode and decode only new tokens; checkpoints are limited.
"""

import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer, TrlParser
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sftlab.chat_format import ChatRenderer, stop_token_ids
from sftlab.config import CleanArguments, DataArguments, ModelArguments, read_config_file
from sftlab.data.prepare import PreparedData, prepare_data
from sftlab.errors import UserError, report, write_failure
from sftlab.files import append_jsonl, keep_lines, write_atomic
from sftlab.model.load import (
    ADAPTER_CONFIG,
    load_model,
    load_tokenizer,
    quantization_config,
    recorded_base_name,
    resolve_model_path,
    save_tokenizer,
)
from sftlab.train.batching import (
    BatchPlan,
    SamplerEpochCallback,
    TokenBudgetSampler,
    batch_plan,
    fixed_size_batches,
    resolve_padding_free,
    training_attention,
)
from sftlab.train.callbacks import DEFAULT_PROBES, JsonlLogCallback, ProbeCallback, run_probes
from sftlab.train.checkpoints import RunLock, commit, newest_committed, rotate
from sftlab.train.guards import BadSteps, StopAtOnce, StopOnSignal, Stopped, refuse_non_finite
from sftlab.train.loss import add_supervised_lm_head
from sftlab.train.resume import (
    RESOLVED_CONFIG,
    check_output_dir,
    check_resume_config,
    effective_record,
    forget_after,
    has_final,
    is_complete,
    mark_complete,
    record_amendment,
)
from sftlab.train.tracking import check_report_to, finish_swanlab, start_swanlab

# PEFT still calls transformers' old name on every step; the warning says nothing a user can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


@dataclass
class TrainConfig(SFTConfig):
    """TRL's SFTConfig with the tutorial's defaults, plus sftlab's own fields."""

    output_dir: str = field(default="./output/lora-glm4-9b-alpaca", metadata={"help": "Run directory."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the training split."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Train batch size per device."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Eval batch size per device."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate (full FT: ~5e-5)."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision. Unset: on where the GPU supports it (the tutorial: on)."}
    )
    bf16_full_eval: bool | None = field(default=None, metadata={"help": "Evaluate fully in bf16. Unset: as bf16."})
    max_length: int | None = field(
        default=512, metadata={"help": "Max tokens per sample (template included); longer ones are dropped, "
                               "or truncated with data overflow=truncate. The tutorial's max_seq_length no longer "
                               "exists in TRL and was silently ignored."}
    )
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: no, steps, epoch."})
    eval_steps: float | None = field(default=0.1, metadata={"help": "Evaluate every N steps (<1: share of all)."})
    save_steps: float = field(default=0.1, metadata={"help": "Checkpoint every N steps (<1: share of all)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    activation_checkpointing: bool | None = field(
        default=True, metadata={"help": "Recompute activations in backward to save memory (TRL's default: on)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5)."}
    )
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept (oldest deleted)."})
    report_to: None | str | list[str] = field(
        default="swanlab", metadata={"help": "none, or any tracker transformers supports (swanlab, tensorboard, wandb, "
                                     "mlflow, trackio, ...); SwanLab runs locally without a login."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir."})
    probe_prompts: list[str] = field(
        default_factory=lambda: list(DEFAULT_PROBES),
        metadata={"help": "Prompts answered (greedy) at every save, logged to predictions.jsonl and SwanLab."},
    )
    probe_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Max new tokens per probe reply. None: from the data (reply_limit)."}
    )
    final_eval_samples: int = field(
        default=200, metadata={"help": "Held-out conversations evaluated after training (eval/results.json); 0: none."}
    )
    final_eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Max new tokens per reply in that evaluation. None: twice the 99th "
                                "percentile of the training replies' length (at least 32, at most 1024), so a "
                                "correct reply is not counted as 'did not stop' for being long."}
    )
    retention_check: bool = field(
        default=True, metadata={"help": "With the final evaluation of a LoRA run: did tuning keep what the base "
                                "knew? General probes answered by the tuned model and by its base (the adapter "
                                "disabled: no second model is loaded), and the loss rise on the base's own replies; "
                                "a verdict (kept, degraded, lost) in eval/results.json, report.md and the model "
                                "card. Full fine-tuning: sftlab eval --compare-base."}
    )
    # typed str for the parser, which reads "auto", "null" and numbers alike; __post_init__ makes it an int or None
    max_tokens_per_batch: str | None = field(
        default="auto", metadata={"help": "Token budget of one micro-batch: samples are grouped by length so each "
                                  "micro-batch holds about this many tokens (padding included) with little padding, "
                                  "in an order shuffled under the seed. auto: 8192 on a GPU, 2048 on CPU (activations "
                                  "that stay in the CPU's caches: 1.2x faster than 8192 on SmolLM2-135M). null: "
                                  "per_device_train_batch_size samples in random order, as TRL does."}
    )
    padding_free: bool | None = field(
        default=None, metadata={"help": "Concatenate a micro-batch into one row (position_ids restart per sample, "
                                "no attention across samples). None: on with a varlen attention kernel "
                                "(FlashAttention-2 on GPU, sftlab's sdpa_varlen elsewhere, chosen when "
                                "attn_implementation is unset); off with plain sdpa or eager, where it is exact but "
                                "slower than length-grouped padded batches."}
    )
    max_bad_steps: int = field(
        default=10, metadata={"help": "Bad optimizer steps in a row that stop the run: a non-finite loss or gradient "
                              "(skipped, weights and optimizer state untouched, counted as skipped_steps), a "
                              "gradient of exactly zero, or a loss over 3x that of the first 5 steps (divergence "
                              "that stays finite)."}
    )
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "Replace a non-finite logged loss by the running mean (transformers' "
                                 "default, which shows 0.0 when every step is NaN). sftlab logs it as it is."}
    )
    supervised_head: bool = field(
        default=True, metadata={"help": "Run the LM head and loss only on supervised positions, in chunks (no "
                                "full-vocabulary logits). False: TRL's own fused head."}
    )

    def __post_init__(self):
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or ["none"])
        check_report_to(reports)
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if self.bf16_full_eval is None:
            self.bf16_full_eval = self.bf16
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        self.max_tokens_per_batch = token_budget(self.max_tokens_per_batch, self.max_length)
        check_ranges(self)
        super().__post_init__()


GPU_TOKENS_PER_BATCH, CPU_TOKENS_PER_BATCH = 8192, 2048  # benchmarks/train_throughput.py measured both on CPU


def token_budget(value, max_length: int | None = None) -> int | None | str:
    """max_tokens_per_batch as given (a YAML int, or a string from the command line) -> an int or None; a value
    that is neither is left for check_ranges to name. auto holds at least one sample of max_length."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            budget = GPU_TOKENS_PER_BATCH if torch.cuda.is_available() else CPU_TOKENS_PER_BATCH
            return max(budget, max_length or 0)
        if text in ("null", "none"):
            return None
        return int(text) if text.lstrip("-").isdigit() else value
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# (field, test, what the value must be): checked before transformers sees the config, so a bad value is one
# line naming the field and its range, never a traceback from deep inside a library
RANGES = [
    ("learning_rate", lambda v: _number(v) and v > 0, "a positive number"),
    ("num_train_epochs", lambda v: _number(v) and v > 0, "a positive number"),
    ("max_steps", lambda v: isinstance(v, int) and (v == -1 or v > 0), "-1 (use num_train_epochs) or positive"),
    ("per_device_train_batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("per_device_eval_batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("gradient_accumulation_steps", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("max_tokens_per_batch", lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1, auto or null"),
    ("max_length", lambda v: v is None or (isinstance(v, int) and v >= 8), "an integer >= 8, or null"),
    ("save_steps", lambda v: _number(v) and v > 0, "a positive number (< 1: a share of all steps)"),
    ("eval_steps", lambda v: v is None or (_number(v) and v > 0), "a positive number (< 1: a share of all steps)"),
    ("logging_steps", lambda v: _number(v) and v > 0, "a positive number (< 1: a share of all steps)"),
    ("warmup_steps", lambda v: _number(v) and v >= 0, "a number >= 0 (< 1: a share of all steps)"),
    ("weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("max_grad_norm", lambda v: _number(v) and v >= 0, "a number >= 0 (0: no clipping)"),
    ("save_total_limit", lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1, or null"),
    ("max_bad_steps", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("final_eval_samples", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("probe_max_new_tokens", lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1, or null"),
    ("final_eval_max_new_tokens", lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1, or null"),
]


def check_ranges(config: TrainConfig) -> None:
    if not str(config.output_dir or "").strip():
        raise ValueError("output_dir: must name a folder, got an empty string")
    for name, valid, allowed in RANGES:
        value = getattr(config, name)
        if not valid(value):
            raise ValueError(f"{name}: must be {allowed}, got {value!r}")


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, CleanArguments, TrainConfig]:
    parser = TrlParser((ModelArguments, DataArguments, CleanArguments, TrainConfig), prog="sftlab train")
    read_config_file(argv)  # a missing file or a YAML that is not a mapping: one line before TrlParser reads it
    try:
        return parser.parse_args_and_config(args=argv)
    except ValueError as exc:
        raise UserError(_config_error_line(exc)) from exc


def _config_error_line(exc: ValueError) -> str:
    text = str(exc)
    if "Unknown arguments from config file" in text or "not used by the HfArgumentParser" in text:
        keys = re.findall(r"'--([\w.-]+)'", text)
        return f"unknown config key(s): {', '.join(keys) or text}. `sftlab train --help` lists the fields"
    return f"config: {text.splitlines()[0]}"


def resolved_config(model_args, data_args, clean_args, train_args, fingerprint: str | None = None,
                    sources: dict[str, str] | None = None) -> dict:
    train = {k: v for k, v in train_args.to_dict().items() if not k.startswith("_")}
    return {"model": asdict(model_args), "data": asdict(data_args), "clean": asdict(clean_args), "train": train,
            "world_size": train_args.world_size, "data_fingerprint": fingerprint, "data_sources": sources or {}}


def check_lora_targets(model_path: Path, model_args: ModelArguments) -> None:
    """Every LoRA target names a module of the model, and no module trained in full is tied to another
    (checked on the meta device: nothing is loaded)."""
    checks_targets = model_args.lora_target_modules != ["all-linear"]
    if not model_args.use_peft or not (checks_targets or model_args.lora_modules_to_save):
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    refuse_tied_modules_to_save(model, model_args.lora_modules_to_save or [])
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [t for t in model_args.lora_target_modules if t not in names] if checks_targets else []
    if missing:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"lora_target_modules: {', '.join(missing)} matches no module of the model; its linear "
                        f"layers are {', '.join(linear)} (or use all-linear)")


def check_context(model_path: Path, max_length: int | None) -> None:
    """max_length within the model's context (max_position_embeddings): past it, positions the model never saw."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(model_path).get_text_config(), "max_position_embeddings", None)
    if max_length is not None and context is not None and max_length > context:
        raise UserError(f"max_length {max_length} is above the model's context of {context} tokens "
                        f"(max_position_embeddings): set max_length to {context} or less")


def refuse_tied_modules_to_save(model, modules_to_save: list[str]) -> None:
    """A full copy of a tied embedding is refused: PEFT would train lm_head apart from the input embeddings, so
    the adapter would carry a vocabulary-sized copy (152 MB for SmolLM2-135M) and the merged model would come out
    untied. (PEFT's ensure_weight_tying keeps the two copies tied, but the copy stays in the adapter.)"""
    config = model.config.get_text_config()
    if not getattr(config, "tie_word_embeddings", False):
        return
    embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
    tied = {name.split(".")[-1] for name, module in model.named_modules() if any(module is e for e in embeddings)}
    named = [m for m in modules_to_save if m in tied]
    if named:
        size = config.vocab_size * config.hidden_size
        raise UserError(f"lora_modules_to_save: {', '.join(named)} is tied to the model's other embedding "
                        f"(tie_word_embeddings): training it in full would put a {size / 1e6:.1f}M-parameter copy in "
                        "the adapter and untie the merged model. Leave it out (LoRA on all-linear adapts the model "
                        "without it), or train every weight with use_peft false")


def lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    return LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
        modules_to_save=model_args.lora_modules_to_save,
    )


def train(model_args: ModelArguments, data_args: DataArguments, clean_args: CleanArguments,
          train_args: TrainConfig) -> Path:
    """Runs one SFT job and returns the run directory, which then holds the final adapter or model. The main
    process holds the output_dir's lock for the whole run."""
    out = Path(train_args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder")
    quantization_config(model_args.load_in_4bit)  # no GPU or no bitsandbytes: say so before anything else
    if train_args.resume and is_complete(out):
        print(f"run {out} is finished (its final weights, evaluation and report are there): nothing to resume, "
              "nothing changed")
        return out
    lock = RunLock(out) if train_args.process_index == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        if train_args.resume and has_final(out):
            return complete_run(out, train_args.process_index == 0)
        return run_training(model_args, data_args, clean_args, train_args)
    finally:
        if lock is not None:
            lock.release()


def prepare_once(data_args: DataArguments, clean_args: CleanArguments, renderer: ChatRenderer,
                 train_args: TrainConfig) -> PreparedData:
    """The data, prepared by the main process of each machine while the others wait, then read from its cache by
    them. When the main one fails, it says why before it releases the others (which then stop at once, and the
    launcher ends the rest: a line printed later could be lost), and they do not prepare the data again."""
    first = train_args.world_size == 1 or train_args.local_process_index == 0
    with train_args.main_process_first(desc="data preparation"):
        if not first:
            return prepare_data(data_args, clean_args, renderer, cached_only=True)
        try:
            return prepare_data(data_args, clean_args, renderer)
        except UserError as exc:
            if train_args.world_size > 1:
                report("train", exc)
            raise


def run_training(model_args: ModelArguments, data_args: DataArguments, clean_args: CleanArguments,
                 train_args: TrainConfig) -> Path:
    out = Path(train_args.output_dir)
    is_main = train_args.process_index == 0
    resume_from = check_output_dir(out, train_args.resume, is_main)
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path, train_args.trust_remote_code)
    renderer = ChatRenderer(tokenizer, train_args.max_length, data_args.overflow)
    check_lora_targets(model_path, model_args)  # before the data: a preparation can take long
    check_context(model_path, train_args.max_length)
    data = prepare_once(data_args, clean_args, renderer, train_args)
    print(data.summary())
    if not len(data.train):
        if len(data.test):
            raise UserError(f"test_size {data_args.test_size} leaves no training samples: all {len(data.test)} usable "
                            "rows were held out; lower test_size (a share of the rows, e.g. 0.05)")
        raise UserError(f"no training samples left from {', '.join(data_args.data_files)} ({data.summary()})")
    lengths = data.train["length"]  # read once: the budget check here, the sampler below
    longest = max(lengths)
    if train_args.max_tokens_per_batch is not None and train_args.max_tokens_per_batch < longest:
        raise UserError(f"max_tokens_per_batch {train_args.max_tokens_per_batch} is smaller than the longest training "
                        f"sample ({longest} tokens): each such sample would be a micro-batch of its own, over the "
                        f"budget. Raise it to at least {longest} (or to max_length, {train_args.max_length})")
    if not len(data.test) and train_args.eval_strategy != "no":
        strategy = getattr(train_args.eval_strategy, "value", train_args.eval_strategy)
        raise UserError(f"eval_strategy {strategy} needs a held-out split, and there is none "
                        f"(test_size {data_args.test_size}, {len(data.train)} training samples): set eval_strategy: "
                        "no, or test_size > 0 with at least 2 usable rows")
    set_reply_limits(train_args, data.report)
    config = resolved_config(model_args, data_args, clean_args, train_args, data.fingerprint, data.sources)
    amendment = None
    if resume_from:  # checked on every process (the others would wait forever for a main that stopped)
        step = int(Path(resume_from).name.split("-")[-1])
        amendment = check_resume_config(out, config, step)
        if is_main:
            forget_after(out, step)
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_run_inputs(out, config, data)
    attention = training_attention(model_args.attn_implementation, train_args.padding_free, model_args.dtype)
    model = load_model(model_path, model_args.dtype, train_args.trust_remote_code, attention,
                       record_name=recorded_base_name(model_args.model_name_or_path),
                       load_in_4bit=model_args.load_in_4bit)
    padding_free = resolve_padding_free(train_args.padding_free, model.config._attn_implementation, is_main)
    sampler, plan = token_sampler(train_args, lengths, padding_free, is_main)

    reports = [train_args.report_to] if isinstance(train_args.report_to, str) else train_args.report_to
    if "swanlab" in reports and is_main:
        start_swanlab(str(out), train_args.run_name, config)
    stopper = StopOnSignal()
    probe = ProbeCallback(tokenizer, train_args.probe_prompts, train_args.probe_max_new_tokens, str(out),
                          data_args.system_prompt, stopper)
    train_args.padding_free = False  # TRL's own padding-free path refuses max_length; sftlab's collator does it
    # the samples are already tokenized, fitted to max_length and each has supervised tokens: TRL's own
    # preparation (a truncation pass and a filter over every row) would only re-read them
    train_args.dataset_kwargs = {**(train_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    trainer = SftlabTrainer(
        model=model, args=train_args, processing_class=tokenizer,
        train_dataset=data.train.select_columns(["input_ids", "labels"]),
        eval_dataset=(data.test.select_columns(["input_ids", "labels"])
                      if len(data.test) and train_args.eval_strategy != "no" else None),
        peft_config=lora_config(model_args) if model_args.use_peft else None,
        data_collator=DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=padding_free),
        callbacks=[probe, JsonlLogCallback(str(out)), stopper], token_sampler=sampler,
        bad_steps=BadSteps(train_args.max_bad_steps), amendment=amendment,
    )
    train_args.padding_free = padding_free  # what was used, for the manifest
    sharded = sharded_engine(trainer)
    if sharded and probe.prompts:
        probe.prompts = []  # one process cannot generate with weights split across all of them
        if is_main:
            print(f"probes and the held-out evaluation are skipped under {sharded} (the weights are sharded across "
                  f"processes): after training, run: sftlab eval --adapter {out}")
    if train_args.supervised_head:
        unwrapped = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        add_supervised_lm_head(unwrapped)
    stopper.install()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
        if stopper.received is not None:
            stopped_by_signal(stopper.received, trainer.state.global_step, out, is_main)
        if is_main:  # before the final save, so that a run completed after a crash still says how it trained
            write_training_manifest(out, data, train_args.seed, {
                "attention": trainer.model.config._attn_implementation, "padding_free": padding_free,
                "batches": {**asdict(plan), "summary": plan.summary()}})
        save_final(trainer, tokenizer, out, model_args)  # every process: sharded engines gather the weights
        if stopper.received is not None:  # it arrived during the save, which was let finish
            stopped_after_final_save(stopper.received, out, "the final save", is_main)
        stopper.uninstall()
        if is_main:
            finish_run(trainer.model, tokenizer, out, trainer.state.global_step, finish_settings(config),
                       data.test_messages, sharded)
    finally:
        stopper.uninstall()
        if "swanlab" in reports and is_main:
            finish_swanlab()
    return out


def finish_settings(config: dict) -> dict:
    """What the steps after the final save use, from a resolved config: the live run's, or a completed run's
    record with its amendments."""
    return {**{name: config["train"][name] for name in FINISH_FIELDS}, "system_prompt": config["data"]["system_prompt"]}


FINISH_FIELDS = ("probe_prompts", "probe_max_new_tokens", "final_eval_samples", "final_eval_max_new_tokens",
                 "retention_check")


def complete_run(out: Path, is_main: bool) -> Path:
    """--resume on a run whose final weights are saved but whose evaluation, probes, report or manifest are not
    (it was killed after its final save): does what is missing, with the run's recorded settings, without
    training. The model is loaded from the run folder, as `sftlab eval` loads it."""
    from sftlab.eval.run_report import read_json, read_jsonl
    from sftlab.model.load import load_for_inference

    if not is_main:
        return out
    print(f"run {out}: its final weights were saved, but it stopped before its evaluation and report: completing "
          "them with the run's recorded settings (no training)")
    adapter = (out / ADAPTER_CONFIG).exists()
    model, tokenizer = load_for_inference(adapter=str(out)) if adapter else load_for_inference(model=str(out))
    step = read_json(out / "trainer_state.json")["global_step"]
    heldout = [record["messages"] for record in read_jsonl(out / "heldout.jsonl")]
    finish_run(model, tokenizer, out, step, finish_settings(effective_record(out)), heldout, None)
    return out


def reply_limit(report: dict) -> int:
    """Twice the 99th percentile of the training replies' token length, within [32, 1024]."""
    p99 = report.get("tokens", {}).get("response", {}).get("p99") or 128
    return max(32, min(1024, 2 * int(p99)))


def set_reply_limits(train_args: TrainConfig, report: dict) -> None:
    """Fills the probe and final-evaluation generation limits the config left unset, from the data."""
    limit = reply_limit(report)
    names = ("probe_max_new_tokens", "final_eval_max_new_tokens")
    unset = [name for name in names if getattr(train_args, name) is None]
    for name in unset:
        setattr(train_args, name, limit)
    if unset and train_args.process_index == 0:
        print(f"replies in probes and the final evaluation: up to {limit} new tokens (twice the p99 reply length "
              f"of the training data; set {' / '.join(unset)} to change it)")


class SftlabTrainer(SFTTrainer):
    """TRL's SFTTrainer, fed by token-budget micro-batches when a sampler is given, with committed checkpoints
    and non-finite steps skipped."""

    def __init__(self, *args, token_sampler: TokenBudgetSampler | None = None,
                 bad_steps: BadSteps | None = None, amendment: dict | None = None, **kwargs):
        self.token_sampler, self.bad_steps, self.amendment = token_sampler, bad_steps, amendment
        if bad_steps is not None:  # first, so that the log record it annotates is the one written to disk
            kwargs["callbacks"] = [bad_steps, *(kwargs.get("callbacks") or [])]
        kwargs["callbacks"] = [OnResume(self), *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)
        if token_sampler is not None:
            self.add_callback(SamplerEpochCallback(token_sampler))
        self.resumed_from: str | None = None

    def train(self, resume_from_checkpoint=None, **kwargs):
        self.resumed_from = resume_from_checkpoint
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.bad_steps is not None and not getattr(optimizer, "_sftlab_guarded", False):
            self.bad_steps.guard(optimizer)
            optimizer._sftlab_guarded = True
        return optimizer

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.bad_steps is not None:
            self.bad_steps.observe_loss(loss)
        return loss

    def _get_train_sampler(self, train_dataset=None):
        return self.token_sampler if self.token_sampler is not None else super()._get_train_sampler(train_dataset)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, then sftlab's commit marker (train/checkpoints.py), then the rotation: the
        Trainer would delete old checkpoints before the new one is complete."""
        refuse_non_finite(self.model, f"checkpoint of step {self.state.global_step}")
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as exc:
            raise_write_failure(exc, f"checkpoint-{self.state.global_step}", Path(self.args.output_dir))
        finally:
            self.args.save_total_limit = limit
        log_state = save_log_state(self)  # a collective: on every process
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            write_atomic(folder / LOG_STATE, json.dumps(log_state) + "\n")
            commit(folder)
            rotate(folder.parent, limit, folder)


LOG_STATE = "sftlab_log_state.json"


def save_log_state(trainer) -> dict:
    """What the Trainer's logging holds between logging steps, which its checkpoints do not keep: the loss summed
    since the last logged step (the mean over processes), that step, and the sum over every logged step. Without
    it, the first loss logged after a resume averages only the steps since the resume, and the run's train_loss
    only those of the last invocation."""
    from transformers.trainer_pt_utils import nested_gather

    pending = nested_gather(trainer._tr_loss.detach(), trainer.args.parallel_mode).float().mean().item()
    # TRL's own metrics (token accuracy, entropy: averaged over the steps since the last log) and token count
    metrics = {key: list(values) for key, values in getattr(trainer, "_metrics", {}).get("train", {}).items()}
    return {"pending_loss": pending, "last_logged_step": trainer._globalstep_last_logged,
            "logged_loss_sum": trainer._total_loss_scalar, "trl_metrics": metrics,
            "total_train_tokens": getattr(trainer, "_total_train_tokens", 0)}


class OnResume(TrainerCallback):
    """As training resumes: records the amendment it resumed with, and restores save_log_state's record, so every
    logged loss (and train_loss) equals an uninterrupted run's."""

    def __init__(self, trainer):
        self.trainer, self.restored = trainer, False

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            record_amendment(Path(args.output_dir), self.trainer.amendment)
        folder = self.trainer.resumed_from
        path = Path(folder) / LOG_STATE if folder else None
        if path is None or not path.exists():  # a fresh run, or a checkpoint written before sftlab kept it
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        self.trainer._tr_loss += saved["pending_loss"]
        self.trainer._globalstep_last_logged = saved["last_logged_step"]
        self.trainer._total_loss_scalar = saved["logged_loss_sum"]
        if hasattr(self.trainer, "_metrics"):
            self.trainer._metrics["train"].clear()
            self.trainer._metrics["train"].update(saved["trl_metrics"])
            self.trainer._total_train_tokens = saved["total_train_tokens"]
        self.restored = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.restored and logs is not None and "train_loss" in logs and state.global_step:
            # the Trainer divides by the steps of this invocation; the sum restored covers every step
            logs["train_loss"] = self.trainer._total_loss_scalar / state.global_step


def raise_write_failure(exc: BaseException, what: str, out: Path) -> None:
    """A full disk or an unwritable folder while saving: one line naming it, and the newest committed checkpoint,
    which the failed save left intact; anything else is raised as it was."""
    why = write_failure(exc)
    if why is None:
        raise exc
    committed, _ = newest_committed(out)
    kept = f"{committed} is committed and intact" if committed else "no checkpoint was committed yet"
    detail = getattr(exc, "filename", None) or str(exc).strip().splitlines()[0][:200]
    raise UserError(f"could not save {what} in {out}: {why} ({detail}). {kept}: free space (or make the folder "
                    "writable) and continue with --resume") from exc


def token_sampler(train_args: TrainConfig, lengths: list[int], padding_free: bool,
                  verbose: bool) -> tuple[TokenBudgetSampler | None, BatchPlan]:
    """The token-budget sampler of this process (None for TRL's fixed-size batches), and what the optimizer
    sees per step (printed, and kept in the manifest and the run report)."""
    world, accumulation = train_args.world_size, train_args.gradient_accumulation_steps
    if train_args.max_tokens_per_batch is None:
        batches = fixed_size_batches(len(lengths), train_args.per_device_train_batch_size, train_args.seed)
        plan = batch_plan(batches, lengths, padding_free, world, accumulation)
        if verbose:
            print(f"batches: {train_args.per_device_train_batch_size} samples per micro-batch: {plan.summary()}")
        return None, plan
    sampler = TokenBudgetSampler(lengths, train_args.max_tokens_per_batch, padding_free, train_args.seed,
                                 num_shards=world, shard=train_args.process_index)
    plan = batch_plan(sampler.epoch_batches(0), lengths, padding_free, world, accumulation)
    if verbose:
        print(f"batches: up to {train_args.max_tokens_per_batch:,} tokens per micro-batch "
              f"(per_device_train_batch_size is not used): {plan.summary()}")
    return sampler, plan


def stopped_after_final_save(signum: int, out: Path, during: str, is_main: bool) -> None:
    """One line when a stop signal ends a run after its final weights were saved; exits 143 or 130."""
    if is_main:
        print(f"stopped by {signal.Signals(signum).name} during {during}: the final weights in {out} are saved; "
              f"complete the evaluation and report with: {resume_command()}", flush=True)
    raise SystemExit(128 + signum)


def resume_command() -> str:
    command = shlex.join(["sftlab", *sys.argv[1:]]) if sys.argv[1:2] == ["train"] else "sftlab train ..."
    return command + ("" if "--resume" in sys.argv else " --resume")


def stopped_by_signal(signum: int, step: int, out: Path, is_main: bool) -> None:
    """One line on where the run stopped and how to go on; exits 143 (SIGTERM) or 130 (SIGINT)."""
    if is_main:
        print(f"stopped by {signal.Signals(signum).name} after step {step}: {out / f'checkpoint-{step}'} is "
              f"committed; continue with: {resume_command()}", flush=True)
    raise SystemExit(128 + signum)


def sharded_engine(trainer) -> str | None:
    """"ZeRO-3" or "FSDP" where the weights are split across processes (the final save then needs every process,
    and no single process can generate), else None (one GPU, DDP, ZeRO-2)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            return "ZeRO-3"
    return None


def finish_run(model, tokenizer, out: Path, step: int, settings: dict, test_messages: list, sharded: str | None
               ) -> None:
    """After the final save, on the main process: probe replies, held-out evaluation, report, model card, and
    last the manifest marked complete (no generation where the weights are sharded: `sftlab eval` does it
    afterwards from the saved run). Each output is rewritten whole, so a run stopped here is completed by
    --resume without a record twice; and since the weights are safe, a stop signal here ends it at once."""
    with StopAtOnce() as stop:
        try:
            write_finish(model, tokenizer, out, step, settings, test_messages, sharded)
        except Stopped:
            stopped_after_final_save(stop.received, out, "the steps after the final save", True)


def write_finish(model, tokenizer, out: Path, step: int, settings: dict, test_messages: list, sharded: str | None
                 ) -> None:
    from sftlab.eval.evaluate import evaluate, with_replies, write_eval
    from sftlab.eval.model_card import write_model_card
    from sftlab.eval.run_report import write_run_report
    from sftlab.eval.tables import table_text

    final = []
    if not sharded:
        prompts, system_prompt = settings["probe_prompts"], settings["system_prompt"]
        replies = run_probes(model, tokenizer, prompts, settings["probe_max_new_tokens"], system_prompt)
        final = [dict(step=step, prompt=p, reply=r.text, finish_reason=r.finish_reason, new_tokens=r.new_tokens,
                      final=True) for p, r in zip(prompts, replies)]
        keep_lines(out / "predictions.jsonl", lambda record: not record.get("final"))  # an interrupted finish's
        append_jsonl(out / "predictions.jsonl", final)
        conversations = test_messages[:settings["final_eval_samples"]]
        if conversations:
            results, replies = evaluate(model, tokenizer, conversations, settings["final_eval_max_new_tokens"],
                                        label="held-out")
            results = {"tuned": results}
            if settings["retention_check"] and hasattr(model, "disable_adapter"):
                from sftlab.eval.retention import adapter_retention

                results["retention"] = adapter_retention(model, tokenizer, system_prompt)
            write_eval(out / "eval", results, with_replies(conversations, {"tuned": replies}))
            print(f"\nHeld-out evaluation ({len(conversations)} conversations):\n{table_text(results)}")
    write_run_report(out)
    write_model_card(out)  # in place of PEFT's empty template
    mark_complete(out)
    if final:
        print_probes(final)


def write_training_manifest(out: Path, data: PreparedData, seed: int, chosen: dict) -> None:
    """The manifest as training ends: the run's own config (a resume may only amend it, in amendments.jsonl),
    the peak memory and what was chosen (attention, batches); `completed` false until the run's last step."""
    from sftlab.eval.run_report import peak_memory_mb, write_manifest

    record = yaml.safe_load((out / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    write_manifest(out, record, data.fingerprint, seed, {"peak_memory_mb": peak_memory_mb(), **chosen,
                                                         "completed": False})


def write_run_inputs(out: Path, config: dict, data: PreparedData) -> None:
    """How the run was made, written before training so even a crashed run says it."""
    from sftlab.eval.run_report import write_manifest

    write_atomic(out / RESOLVED_CONFIG, yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    write_manifest(out, config, data.fingerprint, config["train"]["seed"])
    if data.examples:  # what `sftlab doctor` checks the saved template against
        write_atomic(out / "render_check.json", json.dumps({"samples": data.examples}, ensure_ascii=False) + "\n")
    heldout = "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in data.test_messages)
    write_atomic(out / "heldout.jsonl", heldout)
    rejected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data.rejected)
    write_atomic(out / "rejected.jsonl", rejected)
    write_atomic(out / "data_report.json", json.dumps(data.report, ensure_ascii=False, indent=2) + "\n")


def save_final(trainer, tokenizer, out: Path, model_args: ModelArguments) -> None:
    """Writes the final weights, tokenizer and generation config into a staging folder, then moves them in.

    The marker of a loadable folder (adapter_config.json, or config.json for a full model) is moved last,
    so a crash mid-save never leaves a folder that looks complete. Called on every process: under ZeRO-3 and FSDP
    save_model gathers the sharded weights (a collective); everywhere only the main process writes."""
    refuse_non_finite(trainer.model, "final weights")  # each process checks the weights it holds
    staging = out / ".final.tmp"
    is_main = trainer.is_world_process_zero()
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
    except (OSError, RuntimeError) as exc:
        raise_write_failure(exc, "the final weights", out)
    if not is_main:
        return
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; sftlab_config.yaml says the same in YAML
    save_tokenizer(tokenizer, staging)
    generation_config = trainer.model.generation_config
    # the model's own stop ids plus the template's end of a turn (GLM-4: <|endoftext|>, <|user|>, <|observation|>)
    generation_config.eos_token_id = stop_token_ids(tokenizer, generation_config.eos_token_id)
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.save_pretrained(staging)
    if (staging / ADAPTER_CONFIG).exists():
        config = json.loads((staging / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = recorded_base_name(model_args.model_name_or_path)
        write_atomic(staging / ADAPTER_CONFIG, json.dumps(config, indent=2))
    marker = ADAPTER_CONFIG if (staging / ADAPTER_CONFIG).exists() else "config.json"
    trainer.state.save_to_json(str(staging / "trainer_state.json"))  # in before the marker: a completion reads it
    for item in sorted(staging.iterdir(), key=lambda p: p.name == marker):
        os.replace(item, out / item.name)
    staging.rmdir()


def print_probes(records: list[dict]) -> None:
    print("\nProbe replies of the fine-tuned model:")
    for r in records:
        print(f"  Q: {r['prompt']}\n  A: {r['reply']}   [{r['finish_reason']}, {r['new_tokens']} tokens]")


def main(argv: list[str]) -> Path:
    out = train(*parse_args(argv))
    print(f"\nrun directory: {out}")
    sys.stdout.flush()
    return out
