"""`sftlab dpo`: preference tuning after SFT, on TRL's DPOTrainer, declared as a stage (train/stage.py: prepare ->
build, then the fit and the finish every stage shares), through the same run lifecycle as `sftlab train`
(train/lifecycle.py: the output_dir's lock, token-budget micro-batches, committed checkpoints, a resume that
refuses a changed recipe, the non-finite guards, a clean stop on a signal) and the same run folder
(train/run_files.py: config, manifest, rejected rows, report, model card);
what it does after its final save is train/dpo_finish.py.

Where it starts (`model_name_or_path`): a base model, a merged or fully tuned folder, or an SFT LoRA run. With
LoRA (the default) from an SFT LoRA run, DPO goes on training that run's adapter over its original base
(model/load.py, load_adapter_to_train), so the run saves one adapter over the original base, which PEFT's
AutoPeftModelForCausalLM, vLLM and lm-eval load in one step; its LoRA settings are the SFT adapter's (said at the
start), and the reference is TRL's frozen copy of that adapter as it started (REFERENCE_ADAPTER, never saved: it is
the SFT run's own). With LoRA from a model folder, a new adapter, the reference that model with the adapter
disabled. Either way no second copy of the model is held. In full fine-tuning an SFT LoRA run is merged into its
base in memory and a frozen copy is loaded as the reference (none with precompute_ref_log_probs: the policy scores
the pairs before it trains). SimPO and ORPO need no reference: they train on TRL's CPOTrainer and ORPOTrainer,
with the same lifecycle. The pairs are rendered by the one renderer (data/preference.py), never by TRL's own
tokenization.
"""

import dataclasses
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from trl import DPOConfig, DPOTrainer, TrlParser

# SimPO and ORPO live there in TRL 1.x; said in docs/preference-tuning.md
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from sftlab.chat_format import ChatRenderer
from sftlab.config import DataArguments, ModelArguments, Range
from sftlab.data.preference import PAIR_FIELDS, PreferenceData, prepare_pairs
from sftlab.data.prepare import source_digests
from sftlab.data.sources import dataset_specs, iter_datasets
from sftlab.errors import UserError
from sftlab.internals import attention_of, save_only_adapter
from sftlab.model.load import (
    REFERENCE_ADAPTER,
    load_adapter_to_train,
    load_model,
    load_tokenizer,
    recorded_base_name,
    resolve_model_path,
)
from sftlab.run_dir import (
    ADAPTER_CONFIG,
    is_adapter_folder,
    read_json,
)
from sftlab.train.callbacks import JsonlLogCallback, ProbeCallback
from sftlab.train.checks import check_context, check_lora_targets, check_prepared
from sftlab.train.config import RunFields, batch_setup, lora_config, resolved_config, set_reply_limits
from sftlab.train.dpo_finish import finish_dpo
from sftlab.train.guards import BadSteps, StopOnSignal
from sftlab.train.lifecycle import ReliableTrainer, sharded_engine
from sftlab.train.resume import check_output_dir, resume_or_start
from sftlab.train.retention_guard import RetentionAtSaves
from sftlab.train.run_files import write_run_inputs
from sftlab.train.stage import Built, Prepared, Stage, run_stage

# PEFT still calls transformers' old name on every step; the warning says nothing a user can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down", "discopop", "sigmoid_norm", "sft")  # TRL's DPO losses that take the same pairs
REFERENCE_FREE = ("simpo", "orpo")  # TRL's CPOTrainer (loss simpo) and ORPOTrainer: no reference model


@dataclass
class DpoConfig(RunFields, DPOConfig):
    """TRL's DPOConfig with sftlab's run fields (train/config.py, RunFields)."""

    output_dir: str = field(default="./output/dpo", metadata={"help": "Run directory."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training pairs."})
    learning_rate: float = field(
        default=5e-6, metadata={"help": "Peak AdamW learning rate (DPO wants far less than SFT: 5e-6 for LoRA on a "
                                "pretrained model, 5e-7 in full)."}
    )
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Pairs per micro-batch, when max_tokens_per_batch is null."}
    )
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Eval pairs per batch."})
    max_length: int | None = field(
        default=1024, metadata={"help": "Max tokens of the prompt with either reply (template included); a longer "
                                "pair is rejected as too_long, never truncated."}
    )
    beta: float = field(
        default=0.1, metadata={"help": "How far the policy may move from the reference: higher stays closer. For "
                               "loss_type ipo, IPO's regularisation tau."}
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "sigmoid (DPO), ipo (IPO), hinge (SLiC), robust (rDPO), or another of TRL's DPO losses "
                  f"that take the same pairs ({', '.join(LOSS_TYPES[4:])}; several, with loss_weights, are summed); "
                  "or alone, without a reference model: simpo (SimPO; beta ~2, simpo_gamma) or orpo (ORPO; beta is "
                  "its lambda, ~0.1), through TRL's CPOTrainer and ORPOTrainer."},
    )
    simpo_gamma: float = field(
        default=0.5, metadata={"help": "SimPO's target reward margin (loss_type simpo only)."}
    )

    RANGES: ClassVar[dict] = {**RunFields.RANGES, "beta": Range(0, above=True), "simpo_gamma": Range(0)}

    def __post_init__(self):
        self.settle_run_fields()
        super().__post_init__()
        unknown = [name for name in self.loss_type if name not in (*LOSS_TYPES, *REFERENCE_FREE)]
        if unknown:
            raise ValueError(f"loss_type: {', '.join(unknown)} is not one of {', '.join(LOSS_TYPES + REFERENCE_FREE)}")
        if set(self.loss_type) & set(REFERENCE_FREE) and len(self.loss_type) > 1:
            raise ValueError(f"loss_type: {' and '.join(REFERENCE_FREE)} train alone (each from its own trainer, "
                             f"without a reference), got {self.loss_type}")

    @property
    def reference_free(self) -> str | None:
        """"simpo" or "orpo" when the loss needs no reference model, else None (DPO's losses)."""
        return self.loss_type[0] if self.loss_type[0] in REFERENCE_FREE else None


class SftlabDpoTrainer(ReliableTrainer, DPOTrainer):
    """TRL's DPOTrainer with sftlab's run lifecycle (train/lifecycle.py)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # internals.OVERRIDDEN_DPO_METHODS
        return dataset  # rendered by sftlab's renderer (data/preference.py); TRL's would render it a second way


class RenderedRows:
    """tokenize_row for TRL's older preference trainers (CPOTrainer, ORPOTrainer), which tokenize text themselves:
    the pair as sftlab's renderer rendered it, in the keys their collator pads (the prompt masked in the labels)."""

    def tokenize_row(self, feature, model=None):  # internals.OVERRIDDEN_PREFERENCE_METHODS
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            reply = feature[f"{side}_ids"]
            row |= {f"{side}_input_ids": prompt + reply, f"{side}_attention_mask": [1] * (len(prompt) + len(reply)),
                    f"{side}_labels": [-100] * len(prompt) + reply}
        return row


class SftlabSimpoTrainer(ReliableTrainer, RenderedRows, CPOTrainer):
    """TRL's CPOTrainer (loss simpo, no NLL term: SimPO) with sftlab's run lifecycle and rendering."""


class SftlabOrpoTrainer(ReliableTrainer, RenderedRows, ORPOTrainer):
    """TRL's ORPOTrainer with sftlab's run lifecycle and rendering."""


def reference_free_args(dpo_args: DpoConfig):
    """The CPOConfig (SimPO) or ORPOConfig with every field they share with `dpo_args`."""
    config_class = CPOConfig if dpo_args.reference_free == "simpo" else ORPOConfig
    shared = {f.name: getattr(dpo_args, f.name) for f in dataclasses.fields(config_class)
              if f.init and hasattr(dpo_args, f.name) and f.name != "loss_type"}
    if dpo_args.reference_free == "simpo":
        shared |= {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": dpo_args.simpo_gamma}
    return config_class(**shared)


def check(model_args: ModelArguments, data_args: DataArguments, dpo_args: DpoConfig) -> None:
    if data_args.overflow != "drop":
        raise UserError("overflow: a preference pair over max_length is rejected (too_long), never truncated: a "
                        "reply cut short would teach the model to stop mid-answer; remove overflow or raise "
                        "max_length")


def dpo(model_args: ModelArguments, data_args: DataArguments, dpo_args: DpoConfig) -> Path:
    """Runs one DPO job and returns the run directory, which then holds the final adapter or model."""
    return run_stage(DPO, model_args, data_args, None, dpo_args)


def prepare(model_args: ModelArguments, data_args: DataArguments, clean_args: None, dpo_args: DpoConfig,
            stage: str = "dpo") -> Prepared:
    """Checks what can be checked before loading, reads and renders the pairs, and writes the run's inputs (or,
    on a resume, checks the recorded config and drops what is newer than the checkpoint)."""
    out, is_main = Path(dpo_args.output_dir), dpo_args.process_index == 0
    resume_from = check_output_dir(out, dpo_args.resume, is_main)
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path, dpo_args.trust_remote_code)
    if continues_adapter(model_args, model_path):
        if model_args.load_in_4bit:
            raise UserError(f"load_in_4bit with the LoRA run {model_path} as the start: not supported yet; merge it "
                            f"first (sftlab merge --adapter {model_path}) and start from the merged folder")
        adopt_adapter_settings(model_args, model_path, is_main, stage)
    check_lora_targets(model_path, model_args)
    check_context(model_path, dpo_args.max_length)
    data, sources = read_pairs(data_args, ChatRenderer(tokenizer, dpo_args.max_length))
    if is_main:
        print(data.summary())
    if dpo_args.world_size > 1 and dpo_args.max_tokens_per_batch is not None:
        if is_main:
            print(f"batches: {dpo_args.per_device_train_batch_size} pairs per micro-batch on each of the "
                  f"{dpo_args.world_size} processes, not max_tokens_per_batch: TRL's DPO gathers per-pair metrics "
                  "across processes, which needs the same number of pairs in each")
        dpo_args.max_tokens_per_batch = None  # recorded so: a resume on as many processes takes the same batches
    check_prepared(data, pair_lengths(data.train), data_args, dpo_args)  # as SFT's: pairs, budget, held-out split
    set_reply_limits(dpo_args, data.report)
    config = resolved_config(model_args, data_args, None, dpo_args, data.fingerprint, sources, stage=stage)
    amendment = resume_or_start(out, config, resume_from, is_main, lambda: write_run_inputs(out, config, data))
    base_name = (read_json(model_path / ADAPTER_CONFIG)["base_model_name_or_path"]
                 if continues_adapter(model_args, model_path)  # the SFT adapter's own base
                 else recorded_base_name(model_args.model_name_or_path))
    return Prepared(model_path, tokenizer, data, config, resume_from, amendment, base_name)


def continues_adapter(model_args: ModelArguments, model_path: Path) -> bool:
    """LoRA from an SFT LoRA run: DPO goes on training its adapter (the module's docstring)."""
    return model_args.use_peft and is_adapter_folder(model_path)


def adopt_adapter_settings(model_args: ModelArguments, adapter_dir: Path, is_main: bool, stage: str = "dpo"
                           ) -> None:
    """The SFT adapter's LoRA settings become the run's (recorded in its config and card): the adapter DPO goes
    on training has them; the config's own LoRA fields, where they differ, are said to be unused."""
    saved = read_json(adapter_dir / ADAPTER_CONFIG)
    targets = saved.get("target_modules") or []
    adopted = {"lora_r": saved["r"], "lora_alpha": saved["lora_alpha"], "lora_dropout": saved.get("lora_dropout", 0.0),
               "lora_target_modules": sorted({name.split(".")[-1]  # PEFT saves each module's full name
                                              for name in ([targets] if isinstance(targets, str) else targets)}),
               "lora_modules_to_save": saved.get("modules_to_save") or None}
    defaults = {f.name: f.default for f in dataclasses.fields(ModelArguments)}
    unused = [f"{name} {getattr(model_args, name)}" for name, value in adopted.items()  # set, and not the adapter's
              if name != "lora_target_modules" and getattr(model_args, name) not in (value, defaults.get(name))]
    for name, value in adopted.items():
        setattr(model_args, name, value)
    if is_main:
        print(f"{stage}: goes on training the LoRA adapter of the SFT run {adapter_dir} (r {adopted['lora_r']}, alpha "
              f"{adopted['lora_alpha']}, on {', '.join(adopted['lora_target_modules'])}"
              f"{', in full: ' + ', '.join(adopted['lora_modules_to_save']) if adopted['lora_modules_to_save'] else ''}"
              f"), its reference that adapter as it starts"
              + (f"; this config's {', '.join(unused)} are not used" if unused else ""), flush=True)


def read_pairs(data_args: DataArguments, renderer: ChatRenderer) -> tuple[PreferenceData, dict[str, str]]:
    """The data_files' pairs, checked, rendered and split; and each source file's SHA-256."""
    stats = {}
    rows = iter_datasets(dataset_specs(data_args.data_files, PAIR_FIELDS), data_args.split_seed, stats)
    data = prepare_pairs(rows, renderer, data_args.system_prompt, data_args.test_size, data_args.split_seed, stats)
    sources = [source for entry in stats.values() for source in entry["sources"]]
    return data, source_digests(sources)


def pair_lengths(pairs: list[dict]) -> list[int]:
    """What a pair costs a micro-batch: two rows (chosen and rejected, padded alike) of its longer side."""
    return [2 * (len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))) for p in pairs]


def build(model_args: ModelArguments, data_args: DataArguments, dpo_args: DpoConfig, prepared: Prepared
          ) -> Built:
    """The policy, its reference, the micro-batches over the pairs and DPO's trainer (SimPO's, ORPO's)."""
    return build_preference(model_args, data_args, dpo_args, prepared, prepared.data.train, prepared.data.test,
                            pair_lengths(prepared.data.train), dpo_trainer)


def dpo_trainer(dpo_args: DpoConfig, reference, common: dict):
    if dpo_args.reference_free == "simpo":
        return SftlabSimpoTrainer(args=reference_free_args(dpo_args), **common)
    if dpo_args.reference_free == "orpo":
        return SftlabOrpoTrainer(args=reference_free_args(dpo_args), **common)
    return SftlabDpoTrainer(ref_model=reference, args=dpo_args, **common)


def build_preference(model_args: ModelArguments, data_args: DataArguments, args, prepared: Prepared,
                     train_rows: list[dict], test_rows: list[dict], lengths: list[int], make_trainer) -> Built:
    """A preference stage's build (DPO's, KTO's): the policy, its reference (None: the policy with its adapter
    disabled, or the SFT adapter as it started, copied by TRL), the micro-batches over `lengths` (one per training
    row) and the trainer `make_trainer(args, reference, common)` makes with the shared arguments."""
    from datasets import Dataset

    out, is_main = Path(args.output_dir), args.process_index == 0
    reference_free = getattr(args, "reference_free", None)
    continues = continues_adapter(model_args, prepared.model_path)
    model = preference_policy(model_args, args, prepared.model_path, continues, reference_free)
    reference = None  # LoRA: the adapter disabled; precomputed: TRL scores the pairs with the policy before training
    if not model_args.use_peft and not args.precompute_ref_log_probs and not reference_free:
        reference = load_model(prepared.model_path, model_args.dtype, args.trust_remote_code,
                               model_args.attn_implementation, load_in_4bit=model_args.load_in_4bit)
    sampler, _, plan = batch_setup(args, lengths, False, verbose=is_main)
    stopper = StopOnSignal()
    probe = ProbeCallback(prepared.tokenizer, args.probe_prompts, args.probe_max_new_tokens, str(out),
                          data_args.system_prompt, stopper)
    guard = (RetentionAtSaves(prepared.tokenizer, out, data_args.system_prompt, args.retention_stop, stopper,
                              args.retention_patience)
             if args.retention_at_saves else None)  # the base: the model the stage starts from (its SFT model)
    evaluates = bool(test_rows) and args.eval_strategy != "no"
    trainer = make_trainer(args, reference, dict(
        model=model, processing_class=prepared.tokenizer, train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(test_rows) if evaluates else None,
        peft_config=lora_config(model_args) if model_args.use_peft and not continues else None,
        callbacks=[probe, *([guard] if guard else []), JsonlLogCallback(str(out)), stopper], token_sampler=sampler,
        bad_steps=BadSteps(args.max_bad_steps), amendment=prepared.amendment, retention=guard))
    if sharded_engine(trainer) and (probe.prompts or guard):
        probe.prompts, trainer.retention = [], None  # one process cannot generate with weights split across all
        trainer.remove_callback(RetentionAtSaves)
    kind = ("none (" + reference_free + ")" if reference_free else "a frozen copy"
            if reference is not None else "the SFT run's adapter as it started (a frozen copy)" if continues
            else "the policy with its LoRA adapter disabled" if model_args.use_peft else "precomputed")
    chosen = {"attention": attention_of(trainer.model), "reference": kind,
              "batches": {**asdict(plan), "summary": plan.summary()}}
    return Built(trainer, stopper, chosen, getattr(trainer, "ref_model", None))


def preference_policy(model_args: ModelArguments, args, model_path: Path, continues: bool, reference_free):
    """The model a preference stage trains: the SFT run's adapter, trained on (TRL copies it, frozen, as the
    reference: REFERENCE_ADAPTER, never saved), or the model at `model_path`."""
    if not continues:
        return load_model(model_path, model_args.dtype, args.trust_remote_code, model_args.attn_implementation,
                          record_name=recorded_base_name(model_args.model_name_or_path),
                          load_in_4bit=model_args.load_in_4bit)
    model = load_adapter_to_train(model_path, model_args.dtype, args.trust_remote_code, model_args.attn_implementation)
    if reference_free:  # CPO and ORPO keep no copy: the judgement after training needs the start
        model.load_adapter(str(model_path), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    save_only_adapter(model, model.active_adapter)
    return model


LOSS_NAMES = {"simpo": "SimPO", "orpo": "ORPO", "ipo": "IPO"}  # how the card names a loss_type (else DPO)


def describe(config: dict) -> dict:
    """What the card and the report say of a preference run: its loss by name, and its settings."""
    losses = config["train"]["loss_type"]
    return {"title": f"Preference tuning ({LOSS_NAMES.get(losses[0], 'DPO')})", "loss": "DPO loss (mean over pairs)",
            "settings": {"loss": "+".join(losses), "beta": config["train"]["beta"]}}


DPO = Stage("dpo", prepare, build, finish_dpo, describe, check)

ARGUMENTS, PARSER = (ModelArguments, DataArguments, DpoConfig), TrlParser  # cli.py parses them


def run(model_args: ModelArguments, data_args: DataArguments, dpo_args: DpoConfig) -> int:
    out = dpo(model_args, data_args, dpo_args)
    print(f"\nrun directory: {out}", flush=True)
    return 0
