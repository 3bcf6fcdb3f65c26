"""`sftlab kto`: KTO (Kahneman-Tversky optimisation) on TRL's KTOTrainer, declared as a stage (train/stage.py).

KTO learns from replies labelled good or bad one at a time, not from pairs: here the preference pairs `sftlab dpo`
reads, unpaired as TRL unpairs them (each pair's chosen reply a desirable completion of its prompt, its rejected
reply an undesirable one), rendered by the one renderer (data/preference.py), never by TRL's own tokenization.
Everything else is DPO's: where it starts (a base model, a merged folder, or an SFT LoRA run whose adapter it goes
on training, that adapter as it started being the reference), the run lifecycle and folder, and the judgement
after it on held-out pairs (preference accuracy and margins against the reference, each model's greedy replies,
retention for LoRA: train/dpo_finish.py). Its KL term is TRL's estimate from mismatched prompt and completion
pairs (each row's completion paired with its neighbour's prompt in the training order).
"""

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

from trl import KTOConfig, KTOTrainer, TrlParser

from sftlab.config import DataArguments, ModelArguments, Range
from sftlab.train.config import RunFields
from sftlab.train.dpo import build_preference, check, prepare
from sftlab.train.dpo_finish import finish_dpo
from sftlab.train.lifecycle import ReliableTrainer
from sftlab.train.stage import Built, Prepared, Stage, run_stage


@dataclass
class KtoConfig(RunFields, KTOConfig):
    """TRL's KTOConfig with sftlab's run fields (train/config.py, RunFields)."""

    output_dir: str = field(default="./output/kto", metadata={"help": "Run directory."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training replies."})
    learning_rate: float = field(
        default=5e-6, metadata={"help": "Peak AdamW learning rate (as DPO's: 5e-6 for LoRA on a pretrained model)."}
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Replies per micro-batch, when max_tokens_per_batch is null (above 1: the KL "
                             "estimate pairs each reply with another's prompt)."}
    )
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Eval replies per batch."})
    max_length: int | None = field(
        default=1024, metadata={"help": "Max tokens of the prompt with either reply (template included); a longer "
                                "pair is rejected as too_long, never truncated."}
    )
    beta: float = field(
        default=0.1, metadata={"help": "How far the policy may move from the reference: higher stays closer."}
    )
    loss_type: Literal["kto", "apo_zero_unpaired"] = field(
        default="kto", metadata={"help": "kto (KTO, with its KL term) or apo_zero_unpaired (APO-zero, no KL term)."}
    )
    desirable_weight: float = field(
        default=1.0, metadata={"help": "Weight of the desirable replies' loss (raise it when they are fewer)."}
    )
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "Weight of the undesirable replies' loss."}
    )

    RANGES: ClassVar[dict] = {**RunFields.RANGES, "beta": Range(0, above=True),
                              "desirable_weight": Range(0, above=True), "undesirable_weight": Range(0, above=True)}

    def __post_init__(self):
        self.settle_run_fields()
        super().__post_init__()


class SftlabKtoTrainer(ReliableTrainer, KTOTrainer):
    """TRL's KTOTrainer with sftlab's run lifecycle (train/lifecycle.py)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # internals.OVERRIDDEN_DPO_METHODS
        """The replies as sftlab's renderer rendered them (unpaired()); TRL's KL completions added as TRL adds them."""
        if not self.calculate_KL:
            return dataset
        size = args.per_device_train_batch_size

        def rotated(batch):  # TRL's own: within each run of `size` rows, the completions moved on by one
            return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

        return dataset.map(rotated, batched=True, batch_size=size)


def unpaired(pairs: list[dict]) -> list[dict]:
    """Rendered pairs -> KTO's rows: the chosen reply desirable, the rejected one undesirable, each after its
    prompt (the terminator supervised, as in the pair)."""
    return [row for p in pairs for row in (
        {"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids"], "label": True},
        {"prompt_ids": p["prompt_ids"], "completion_ids": p["rejected_ids"], "label": False})]


def build(model_args: ModelArguments, data_args: DataArguments, kto_args: KtoConfig, prepared: Prepared) -> Built:
    train, test = unpaired(prepared.data.train), unpaired(prepared.data.test)
    lengths = [len(row["prompt_ids"]) + len(row["completion_ids"]) for row in train]
    return build_preference(model_args, data_args, kto_args, prepared, train, test, lengths,
                            lambda args, reference, common: SftlabKtoTrainer(ref_model=reference, args=args, **common))


def describe(config: dict) -> dict:
    train = config["train"]
    return {"title": "Preference tuning (KTO)", "loss": "KTO loss (mean over replies)",
            "settings": {"loss": train["loss_type"], "beta": train["beta"], "desirable_weight":
                         train["desirable_weight"], "undesirable_weight": train["undesirable_weight"]}}


KTO = Stage("kto", partial(prepare, stage="kto"), build, finish_dpo, describe, check)

ARGUMENTS, PARSER = (ModelArguments, DataArguments, KtoConfig), TrlParser  # cli.py parses them


def kto(model_args: ModelArguments, data_args: DataArguments, kto_args: KtoConfig) -> Path:
    """Runs one KTO job and returns the run directory, which then holds the final adapter or model."""
    return run_stage(KTO, model_args, data_args, None, kto_args)


def run(model_args: ModelArguments, data_args: DataArguments, kto_args: KtoConfig) -> int:
    out = kto(model_args, data_args, kto_args)
    print(f"\nrun directory: {out}", flush=True)
    return 0
