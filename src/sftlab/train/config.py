"""The train verb's configuration: TRL's SFTConfig with sftlab's fields, their ranges, the command line, and the
quantities derived from a config that `train` and `estimate` share (the batch plan, reply limits, LoRA config)."""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from trl import SFTConfig, TrlParser

from sftlab.config import CleanArguments, DataArguments, ModelArguments, Range, check_fields, parse_verb
from sftlab.train.batching import (
    BatchPlan,
    TokenBudgetSampler,
    batch_plan,
    fixed_size_batches,
)
from sftlab.train.callbacks import DEFAULT_PROBES
from sftlab.train.tracking import check_report_to

SHARE = "(< 1: a share of all steps)"


@dataclass
class RunFields:
    """The fields every sftlab training stage has (SFT's TrainConfig, DPO's DpoConfig), over the TRL config of the
    stage: sftlab's own (resume, probes, final evaluation, token budget, guard) and the defaults sftlab sets on
    transformers' fields. Placed first among the bases, so its defaults win."""

    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision. Unset: on where the GPU supports it (the tutorial: on)."}
    )
    bf16_full_eval: bool | None = field(default=None, metadata={"help": "Evaluate fully in bf16. Unset: as bf16."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: no, steps, epoch."})
    eval_steps: float | None = field(default=0.1, metadata={"help": "Evaluate every N steps (<1: share of all)."})
    save_steps: float = field(default=0.1, metadata={"help": "Checkpoint every N steps (<1: share of all)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept (oldest deleted)."})
    report_to: None | str | list[str] = field(
        default="swanlab", metadata={"help": "none, or any tracker transformers supports (swanlab, tensorboard, wandb, "
                                     "mlflow, trackio, ...); SwanLab runs locally without a login."}
    )
    activation_checkpointing: bool | None = field(
        default=True, metadata={"help": "Recompute activations in backward to save memory (TRL's default: on)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5)."}
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
                                "card. Full fine-tuning: sftlab eval --compare_base."}
    )
    retention_at_saves: bool = field(
        default=False, metadata={"help": "At every save, the retention check (the same general probes as the final "
                                 "one; the base's answers and their losses computed once, as training starts, and "
                                 "kept in the run folder): logged beside the loss (retention/* in trainer_log.jsonl "
                                 "and the tracker), plotted in report.md, kept with the checkpoint. On in the "
                                 "real-model recipes."}
    )
    retention_stop: bool = field(
        default=True, metadata={"help": "With retention_at_saves: end the run (its checkpoint committed, one line) "
                                "when the checks at retention_patience saves in a row say degraded, or one says lost."}
    )
    retention_patience: int = field(
        default=2, metadata={"help": "Saves in a row whose retention is degraded before retention_stop ends the run "
                             "(1: the first). Over ~20 probes the base answers, one borderline answer flips the "
                             "retained share by 5 points: runs whose loss rise fell and accuracy held were judged "
                             "degraded at one save (docs/evaluation.md, Keeping what the model knew)."}
    )
    best_checkpoint: bool = field(
        default=True, metadata={"help": "With retention_at_saves: the final weights are the best checkpoint's: the "
                                "lowest held-out loss among the checkpoints whose retention is kept (the latest "
                                "kept one without a held-out loss; the last one when none is kept, said so). "
                                "Recorded in the manifest and the model card."}
    )
    # typed str for the parser, which reads "auto", "null" and numbers alike; __post_init__ makes it an int or None
    max_tokens_per_batch: str | None = field(
        default="auto", metadata={"help": "Token budget of one micro-batch: samples are grouped by length so each "
                                  "micro-batch holds about this many tokens (padding included) with little padding, "
                                  "in an order shuffled under the seed. auto: 8192 on a GPU, 2048 on CPU (activations "
                                  "that stay in the CPU's caches: 1.2x faster than 8192 on SmolLM2-135M). null: "
                                  "per_device_train_batch_size samples in random order, as TRL does."}
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

    # every field's range, declared once: checked before transformers sees the config, so a bad value is one line
    # naming the field and its range, never a traceback from deep inside a library
    RANGES: ClassVar[dict] = {
        "learning_rate": Range(0, above=True),
        "num_train_epochs": Range(0, above=True),
        "max_steps": Range(1, integer=True, also=(-1,), say="-1 (use num_train_epochs) or positive"),
        "per_device_train_batch_size": Range(1, integer=True),
        "per_device_eval_batch_size": Range(1, integer=True),
        "gradient_accumulation_steps": Range(1, integer=True),
        "max_tokens_per_batch": Range(1, integer=True, nullable=True, say="an integer >= 1, auto or null"),
        "max_length": Range(8, integer=True, nullable=True),
        "save_steps": Range(0, above=True, note=SHARE),
        "eval_steps": Range(0, above=True, nullable=True, note=SHARE),
        "logging_steps": Range(0, above=True, note=SHARE),
        "warmup_steps": Range(0, note=SHARE),
        "weight_decay": Range(0),
        "max_grad_norm": Range(0, note="(0: no clipping)"),
        "save_total_limit": Range(1, integer=True, nullable=True),
        "max_bad_steps": Range(1, integer=True),
        "final_eval_samples": Range(0, integer=True),
        "probe_max_new_tokens": Range(1, integer=True, nullable=True),
        "final_eval_max_new_tokens": Range(1, integer=True, nullable=True),
        "retention_patience": Range(1, integer=True),
    }

    def settle_run_fields(self) -> None:
        """What every stage's __post_init__ does first: the tracker checked, bf16 and the token budget resolved for
        this machine, every range checked."""
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


@dataclass
class TrainConfig(RunFields, SFTConfig):
    """TRL's SFTConfig with the tutorial's defaults, plus sftlab's own fields."""

    output_dir: str = field(default="./output/lora-glm4-9b-alpaca", metadata={"help": "Run directory."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the training split."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Train batch size per device."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Eval batch size per device."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate (full FT: ~5e-5)."})
    max_length: int | None = field(
        default=512, metadata={"help": "Max tokens per sample (template included); longer ones are dropped, "
                               "or truncated with data overflow=truncate. The tutorial's max_seq_length no longer "
                               "exists in TRL and was silently ignored."}
    )
    padding_free: bool | None = field(
        default=None, metadata={"help": "Concatenate a micro-batch into one row (position_ids restart per sample, "
                                "no attention across samples). None: on with a varlen attention kernel "
                                "(FlashAttention-2 on GPU, sftlab's sdpa_varlen elsewhere, chosen when "
                                "attn_implementation is unset); off with plain sdpa or eager, where it is exact but "
                                "slower than length-grouped padded batches."}
    )
    supervised_head: bool = field(
        default=True, metadata={"help": "Run the LM head and loss only on supervised positions, in chunks (no "
                                "full-vocabulary logits). False: TRL's own fused head."}
    )
    # the replay section (in a YAML file also as a mapping: `replay: {ratio: 0.5, prompts: [...]}`)
    replay: bool = field(
        default=False, metadata={"help": "Replay what the base knew: before training, the base answers general "
                                 "prompts greedily, and its own answers that stop become extra training rows "
                                 "(replay_ratio per task training row), rendered like the task's rows, cached, "
                                 "counted apart in the data report, never held out. On in the real-model recipes."}
    )
    replay_ratio: float = field(
        default=0.5, metadata={"help": "Replay rows per task training row (0.5: one replay row for every two task "
                               "rows), up to the replies that stopped (the report says when it falls short)."}
    )
    replay_prompts: list[str] = field(
        default_factory=lambda: ["sftlab:replay-prompts"],
        metadata={"help": "The replay prompts: sftlab:replay-prompts (150 general prompts, English and Chinese, none "
                  "of them a retention probe), and/or your own files (.txt: a prompt a line; .jsonl: {\"prompt\"} "
                  "rows). Keep the retention probes out of them, or the retention check measures what was trained."}
    )
    replay_max_new_tokens: int = field(
        default=128, metadata={"help": "The base's reply limit for replay; replies that do not stop within it are "
                               "left out (counted)."}
    )

    # the select section (in a YAML file also as a mapping: `select: {by: ifd, top: 0.1, scorer: ...}`)
    select: bool = field(
        default=False, metadata={"help": "Train on the rows worth it: before preparation, a small model scores every "
                                 "row (sftlab data score) and the rows with the highest select_by among those not "
                                 "flagged misaligned are kept (sftlab data select: select_top or select_keep). "
                                 "Cached by the data, the scorer's weights and these settings."}
    )
    select_by: Literal["ifd"] = field(
        default="ifd", metadata={"help": "The score that ranks rows, highest first: ifd (instruction-following "
                                 "difficulty)."}
    )
    select_top: float | None = field(default=None, metadata={"help": "The share of the scored rows kept (0.1: the "
                                                                     "top tenth). Give select_top or select_keep."})
    select_keep: int | None = field(default=None, metadata={"help": "The number of rows kept."})
    select_scorer: str = field(
        default="sftlab:smollm2-135m", metadata={"help": "The model that scores (folder, Hub id or "
                                                 "sftlab:smollm2-135m): a small one selects for a large one."}
    )

    RANGES: ClassVar[dict] = {**RunFields.RANGES, "replay_ratio": Range(0, above=True),
                              "replay_max_new_tokens": Range(1, integer=True),
                              "select_top": Range(0, above=True, high=1, nullable=True),
                              "select_keep": Range(1, integer=True, nullable=True)}

    def __post_init__(self):
        self.settle_run_fields()
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


def check_ranges(config: TrainConfig) -> None:
    if not str(config.output_dir or "").strip():
        raise ValueError("output_dir: must name a folder, got an empty string")
    check_fields(config)
    check_named_files(config)
    if getattr(config, "select", False) and (config.select_top is None) == (config.select_keep is None):
        raise ValueError("select: give one of select_top (a share) and select_keep (a number of rows)")


def check_named_files(config) -> None:
    """The files a config names (a DeepSpeed config, replay prompt files) exist, before anything loads: a typo is
    one line now, not a library's traceback after the model has loaded."""
    named = [("deepspeed", config.deepspeed)] if isinstance(config.deepspeed, str) else []
    named += [("replay_prompts", p) for p in getattr(config, "replay_prompts", None) or []
              if isinstance(p, str) and not p.startswith("sftlab:")]
    for name, path in named:
        if not Path(path).exists():
            raise ValueError(f"{name}: {path} does not exist")
        if not Path(path).is_file():
            raise ValueError(f"{name}: {path} is a folder, not a file")


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, CleanArguments, TrainConfig]:
    return parse_verb("sftlab train", TRAIN_ARGUMENTS, argv, TrlParser)


TRAIN_ARGUMENTS = (ModelArguments, DataArguments, CleanArguments, TrainConfig)


def resolved_config(model_args, data_args, clean_args, train_args, fingerprint: str | None = None,
                    sources: dict[str, str] | None = None, stage: str | None = None) -> dict:
    """The run's record. `stage` (a second stage's, "dpo") comes first: a resume with another stage's verb is
    refused by it; a record without one is SFT's. `clean_args` None: a stage without SFT's cleaning settings."""
    train = {k: v for k, v in train_args.to_dict().items() if not k.startswith("_")}
    return {**({"stage": stage} if stage else {}), "model": asdict(model_args), "data": asdict(data_args),
            **({"clean": asdict(clean_args)} if clean_args is not None else {}), "train": train,
            "world_size": train_args.world_size, "data_fingerprint": fingerprint, "data_sources": sources or {}}


def lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    return LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
        modules_to_save=model_args.lora_modules_to_save,
    )


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


def batch_setup(train_args, lengths: list[int], padding_free: bool, verbose: bool = False
                ) -> tuple[TokenBudgetSampler | None, list[list[int]], BatchPlan]:
    """This process's token-budget sampler (None for TRL's fixed-size batches), every process's micro-batches of
    the first epoch, and what the optimizer sees per step (printed, and kept in the manifest and the run report).
    `train` trains with it and `estimate` sizes memory from it, so the two cannot disagree."""
    world, accumulation = max(1, train_args.world_size), train_args.gradient_accumulation_steps
    if train_args.max_tokens_per_batch is None:
        batches = fixed_size_batches(len(lengths), train_args.per_device_train_batch_size, train_args.seed)
        plan = batch_plan(batches, lengths, padding_free, world, accumulation)
        if verbose:
            print(f"batches: {train_args.per_device_train_batch_size} samples per micro-batch: {plan.summary()}")
        return None, batches, plan
    sampler = TokenBudgetSampler(lengths, train_args.max_tokens_per_batch, padding_free, train_args.seed,
                                 num_shards=world, shard=train_args.process_index)
    batches = sampler.epoch_batches(0)
    plan = batch_plan(batches, lengths, padding_free, world, accumulation)
    if verbose:
        print(f"batches: up to {train_args.max_tokens_per_batch:,} tokens per micro-batch "
              f"(per_device_train_batch_size is not used): {plan.summary()}")
    return sampler, batches, plan


def budget_line(train_args, plan: BatchPlan, rows: int) -> str:
    """The training budget in optimizer steps and tokens, and the epochs over this data it comes to: a recipe
    that states its budget in steps (max_steps) trains as much on 20 rows as on 2,000, in more epochs."""
    steps_per_epoch = plan.optimizer_steps_per_epoch
    if train_args.max_steps > 0:
        steps, epochs = train_args.max_steps, train_args.max_steps / steps_per_epoch
        how = f"max_steps {steps}"
    else:
        epochs = train_args.num_train_epochs
        steps, how = math.ceil(epochs * steps_per_epoch), f"num_train_epochs {epochs:g}"
    return (f"budget: {steps} optimizer steps, ~{steps * plan.tokens_per_step:,.0f} tokens seen ({how}) = "
            f"{epochs:.1f} epochs of {rows} training rows")
