"""A training stage as one object: a stage declares what differs (its name, how it prepares its data and writes
the run's inputs, how it builds its model and trainer, what it does after its final save) and run_stage does what
every stage does, the same way: the output_dir's lock and resume checks (train/lifecycle.py), tracking, the fit
and the final save, the manifest, the finish, and the completion of a run stopped after its final save.

SFT (train/sft.py) and DPO (train/dpo.py) are two declarations. A stage's verb is `sftlab <name>` (SFT's is
`sftlab train`), its runs record `stage: <name>` in sftlab_config.yaml (SFT's record none), and the run folder
it writes is every stage's (train/run_files.py), so eval, chat, serve, export and the doctor read it as any run.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sftlab.model.load import load_for_inference, quantization_config
from sftlab.run_dir import (
    ADAPTER_CONFIG,
    HELDOUT,
    SFT_DESCRIPTION,
    TRAINER_STATE,
    effective_record,
    read_json,
    read_jsonl,
)
from sftlab.train.guards import StopOnSignal
from sftlab.train.lifecycle import run_in_output_dir, sharded_engine, train_and_finish
from sftlab.train.run_files import write_training_manifest
from sftlab.train.tracking import tracked


@dataclass
class Prepared:
    """What a stage's prepare step hands its build step."""

    model_path: Path
    tokenizer: object
    data: object  # PreparedData, PreferenceData: .fingerprint, .heldout, .train
    config: dict  # the resolved config, as recorded in the run folder
    resume_from: str | None
    amendment: dict | None
    base_name: str  # how the saved adapter names its base (adapter_config.json)
    lengths: list[int] = field(default_factory=list)  # the training rows' token lengths, where the stage reads them


@dataclass
class Built:
    """What a stage's build step hands the fit."""

    trainer: object  # a ReliableTrainer
    stopper: StopOnSignal
    chosen: dict  # what the manifest records as chosen: attention, padding-free, batches
    reference: object = None  # a preference stage's reference model, where one is held


@dataclass(frozen=True)
class Stage:
    """What differs between training stages; run_stage does the rest."""

    name: str  # recorded as the run's `stage`; its verb is run_dir.stage_verb(name)
    prepare: Callable[..., Prepared]  # (model_args, data_args, clean_args, args): checks, data, the run's inputs
    build: Callable[..., Built]  # (model_args, data_args, args, prepared): the model, its trainer and callbacks
    # (model, tokenizer, out, step, config, heldout, reference, sharded): probes, judgement, report, card, complete
    finish: Callable[..., None]
    # (config) -> {"title", "loss", "settings"}: what the model card and the run report say of the run (its manifest's
    # "stage"); by default SFT's
    describe: Callable[[dict], dict] = lambda config: SFT_DESCRIPTION
    check: Callable[..., None] | None = None  # (model_args, data_args, args): refusals before anything else


def run_stage(stage: Stage, model_args, data_args, clean_args, args) -> Path:
    """Runs (or resumes, or completes) one run of `stage` in args.output_dir; returns the run folder."""
    quantization_config(model_args.load_in_4bit)  # no GPU or no bitsandbytes: said before anything else
    if stage.check is not None:
        stage.check(model_args, data_args, args)
    return run_in_output_dir(args, lambda: start(stage, model_args, data_args, clean_args, args),
                             lambda out, is_main: complete(stage, out, is_main), stage.name)


def start(stage: Stage, model_args, data_args, clean_args, args) -> Path:
    out, is_main = Path(args.output_dir), args.process_index == 0
    prepared = stage.prepare(model_args, data_args, clean_args, args)
    built = stage.build(model_args, data_args, args, prepared)
    trainer, tokenizer = built.trainer, prepared.tokenizer

    def write_manifest():
        write_training_manifest(out, prepared.data, args.seed, {**built.chosen, "final_weights": trainer.final_weights,
                                                                 "stage": stage.describe(prepared.config)})

    def finish():
        stage.finish(trainer.model, tokenizer, out, trainer.state.global_step, prepared.config,
                     prepared.data.heldout, built.reference, sharded_engine(trainer))

    with tracked(args, prepared.config, is_main):
        train_and_finish(trainer, built.stopper, prepared.resume_from, out, write_manifest, tokenizer,
                         prepared.base_name, finish)
    return out


def complete(stage: Stage, out: Path, is_main: bool) -> Path:
    """--resume on a run whose final weights are saved but whose evaluation, probes, report or manifest are not
    (it was stopped after its final save): the stage's finish, with the run's recorded settings, without training.
    The model is loaded from the run folder, as `sftlab eval` loads it."""
    if not is_main:
        return out
    print(f"run {out}: its final weights were saved, but it stopped before its evaluation and report: completing "
          "them with the run's recorded settings (no training)")
    lora = (out / ADAPTER_CONFIG).exists()
    model, tokenizer = load_for_inference(adapter=str(out)) if lora else load_for_inference(model=str(out))
    step = read_json(out / TRAINER_STATE)["global_step"]
    stage.finish(model, tokenizer, out, step, effective_record(out), read_jsonl(out / HELDOUT), None, None)
    return out
