"""`sftlab train`: the tutorial's TRL SFT script, with its defects fixed, declared as a stage (train/stage.py:
prepare -> build, then the fit and the finish every stage shares). The configuration is train/config.py, the checks
before loading train/checks.py, what keeps a run safe train/lifecycle.py, what the run folder gets
train/run_files.py.

Fixes over the tutorial, whose script had these defects: the assistant turn is followed by a supervised terminator and
the prompt is masked (one renderer, chat_format.py); max_length is TRL's real field; `[gMASK]<sop>` appears
once; the split is seeded; probes run in eval mode and decode only new tokens; checkpoints are limited.
"""

import warnings
from dataclasses import asdict, replace
from pathlib import Path

from trl import SFTTrainer, TrlParser

from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments, DataArguments, ModelArguments
from sftlab.data.prepare import PreparedData, prepare_data
from sftlab.data.select import selected_files
from sftlab.internals import attention_of, sft_collator
from sftlab.model.load import load_model, load_tokenizer, recorded_base_name, resolve_model_path
from sftlab.train.batching import resolve_padding_free, training_attention
from sftlab.train.callbacks import JsonlLogCallback, ProbeCallback
from sftlab.train.checks import check_context, check_lora_targets, check_prepared, check_training_rows
from sftlab.train.config import (
    TRAIN_ARGUMENTS,
    TrainConfig,
    batch_setup,
    budget_line,
    lora_config,
    resolved_config,
    set_reply_limits,
)
from sftlab.train.guards import BadSteps, StopOnSignal
from sftlab.train.lifecycle import ReliableTrainer, sharded_engine
from sftlab.train.loss import add_supervised_lm_head
from sftlab.train.replay import with_replay
from sftlab.train.resume import check_output_dir, resume_or_start
from sftlab.train.retention_guard import RetentionAtSaves
from sftlab.train.run_files import (
    finish_run,
    write_run_inputs,
)
from sftlab.train.stage import Built, Prepared, Stage, run_stage

# PEFT still calls transformers' old name on every step; the warning says nothing a user can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


class SftlabTrainer(ReliableTrainer, SFTTrainer):
    """TRL's SFTTrainer with sftlab's run lifecycle (train/lifecycle.py)."""


def train(model_args: ModelArguments, data_args: DataArguments, clean_args: CleanArguments,
          train_args: TrainConfig) -> Path:
    """Runs one SFT job and returns the run directory, which then holds the final adapter or model."""
    return run_stage(SFT, model_args, data_args, clean_args, train_args)


def prepare(model_args: ModelArguments, data_args: DataArguments, clean_args: CleanArguments,
            train_args: TrainConfig) -> Prepared:
    """Checks what can be checked before loading, prepares the data, and writes the run's inputs (or, on a resume,
    checks the recorded config and drops what is newer than the checkpoint)."""
    out, is_main = Path(train_args.output_dir), train_args.process_index == 0
    resume_from = check_output_dir(out, train_args.resume, is_main)
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path, train_args.trust_remote_code)
    renderer = ChatRenderer(tokenizer, train_args.max_length, data_args.overflow)
    check_lora_targets(model_path, model_args)  # before the data: a preparation can take long
    check_context(model_path, train_args.max_length)
    data = prepare_once(selected_data(data_args, clean_args, train_args), clean_args, renderer, train_args)
    if train_args.replay:
        data = with_replay(data, model_path, renderer, data_args, clean_args, train_args, model_args.dtype,
                           cached_only=train_args.world_size > 1)
    print(data.summary())
    lengths = data.train["length"] if len(data.train) else []
    check_prepared(data, lengths, data_args, train_args)
    set_reply_limits(train_args, data.report)
    config = resolved_config(model_args, data_args, clean_args, train_args, data.fingerprint, data.sources)
    amendment = resume_or_start(out, config, resume_from, is_main, lambda: write_run_inputs(out, config, data))
    return Prepared(model_path, tokenizer, data, config, resume_from, amendment,
                    recorded_base_name(model_args.model_name_or_path), lengths)


def build(model_args: ModelArguments, data_args: DataArguments, train_args: TrainConfig, prepared: Prepared
          ) -> Built:
    """The model, the micro-batches and the trainer with its callbacks."""
    out, is_main = Path(train_args.output_dir), train_args.process_index == 0
    tokenizer, data = prepared.tokenizer, prepared.data
    attention = training_attention(model_args.attn_implementation, train_args.padding_free, model_args.dtype)
    model = load_model(prepared.model_path, model_args.dtype, train_args.trust_remote_code, attention,
                       record_name=recorded_base_name(model_args.model_name_or_path),
                       load_in_4bit=model_args.load_in_4bit)
    padding_free = resolve_padding_free(train_args.padding_free, attention_of(model), is_main)
    sampler, _, plan = batch_setup(train_args, prepared.lengths, padding_free, verbose=is_main)
    if is_main:
        print(budget_line(train_args, plan, len(prepared.lengths)))
    stopper = StopOnSignal()
    probe = ProbeCallback(tokenizer, train_args.probe_prompts, train_args.probe_max_new_tokens, str(out),
                          data_args.system_prompt, stopper)
    guard = (RetentionAtSaves(tokenizer, out, data_args.system_prompt, train_args.retention_stop, stopper,
                              train_args.retention_patience)
             if train_args.retention_at_saves else None)
    train_args.padding_free = False  # TRL's own padding-free path refuses max_length; sftlab's collator does it
    # the samples are already tokenized, fitted to max_length and each has supervised tokens: TRL's own
    # preparation (a truncation pass and a filter over every row) would only re-read them
    train_args.dataset_kwargs = {**(train_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    evaluates = len(data.test) and train_args.eval_strategy != "no"
    trainer = SftlabTrainer(
        model=model, args=train_args, processing_class=tokenizer,
        train_dataset=data.train.select_columns(["input_ids", "labels"]),
        eval_dataset=data.test.select_columns(["input_ids", "labels"]) if evaluates else None,
        peft_config=lora_config(model_args) if model_args.use_peft else None,
        data_collator=sft_collator(tokenizer.pad_token_id, padding_free),
        callbacks=[probe, *([guard] if guard else []), JsonlLogCallback(str(out)), stopper], token_sampler=sampler,
        bad_steps=BadSteps(train_args.max_bad_steps), amendment=prepared.amendment, retention=guard,
    )
    train_args.padding_free = padding_free  # what was used, for the manifest
    sharded = sharded_engine(trainer)
    if sharded and (probe.prompts or guard):
        probe.prompts, trainer.retention = [], None  # one process cannot generate with weights split across all
        trainer.remove_callback(RetentionAtSaves)
        if is_main:
            print(f"probes and the held-out evaluation are skipped under {sharded} (the weights are sharded across "
                  f"processes): after training, run: sftlab eval --adapter {out}")
    if train_args.supervised_head:
        unwrapped = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        add_supervised_lm_head(unwrapped)
    return Built(trainer, stopper, {"attention": attention_of(trainer.model), "padding_free": padding_free,
                                    "batches": {**asdict(plan), "summary": plan.summary()}})


def prepare_once(data_args: DataArguments, clean_args: CleanArguments, renderer: ChatRenderer,
                 train_args: TrainConfig) -> PreparedData:
    """The data: prepared here by a one-process run (or read from the cache); read by every process of a
    multi-process run, which never prepares it: one rank tokenizing while the others wait is how runs of other
    tools time out on large data. `sftlab data prepare` with the same config prepares it, once, first."""
    return prepare_data(data_args, clean_args, renderer, cached_only=train_args.world_size > 1)


def selected_data(data_args: DataArguments, clean_args: CleanArguments, train_args: TrainConfig) -> DataArguments:
    """The data to prepare: the config's own, or with a `select` section, the rows it selects (scored once)."""
    if not train_args.select:
        return data_args
    return replace(data_args, data_files=selected_files(data_args, clean_args, train_args,
                                                        cached_only=train_args.world_size > 1))


def prepare_only(model_args: ModelArguments, data_args: DataArguments, clean_args: CleanArguments,
                 train_args: TrainConfig) -> int:
    """`sftlab data prepare`: the data `sftlab train` with the same config reads, prepared (or resumed)."""
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path, train_args.trust_remote_code)
    renderer = ChatRenderer(tokenizer, train_args.max_length, data_args.overflow)
    data = prepare_data(selected_data(data_args, clean_args, train_args), clean_args, renderer)
    check_training_rows(data, data_args)  # before replay, which would otherwise be all it trains on
    if train_args.replay:
        data = with_replay(data, model_path, renderer, data_args, clean_args, train_args, model_args.dtype)
    print(data.summary())
    print(f"prepared data: {data.folder} ({data.fingerprint}); `sftlab train` with the same config reads it")
    return 0


SFT = Stage("sft", prepare, build, finish_run)

ARGUMENTS, PARSER = TRAIN_ARGUMENTS, TrlParser  # `sftlab train`'s arguments (cli.py parses them)


def run(model_args: ModelArguments, data_args: DataArguments, clean_args: CleanArguments,
        train_args: TrainConfig) -> int:
    out = train(model_args, data_args, clean_args, train_args)
    print(f"\nrun directory: {out}", flush=True)
    return 0
