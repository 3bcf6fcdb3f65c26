"""Every use sftlab makes of a private or internal API of transformers, TRL or tokenizers, in one module, each with
a test of what it assumes (tests/test_internals.py): after an upgrade those tests fail first, naming what moved.

Public hooks do the rest: callbacks (checkpoint commit and rotation on `on_save`, the bad-step guard on
`on_pre_optimizer_step`), `training_step`, `compute_loss`. What is here has no public equivalent. TRL is imported
here only inside the functions train/ calls, so no other package imports it through this module.
"""

from pathlib import Path

# Trainer methods sftlab's trainers override (train/lifecycle.py): the Trainer's own sampler choice is private
OVERRIDDEN_TRAINER_METHODS = {"_get_train_sampler": ("self", "train_dataset")}
USED_TRAINER_METHODS = {"_load_from_checkpoint": ("self", "resume_from_checkpoint", "model")}  # called, not overridden
# and DPOTrainer's and KTOTrainer's dataset preparation (their own tokenization), which `sftlab dpo` and `sftlab kto`
# replace by the renderer's
OVERRIDDEN_DPO_METHODS = {"_prepare_dataset": ("self", "dataset", "processing_class", "args", "dataset_name")}
# and the row tokenization of TRL's experimental CPOTrainer (SimPO) and ORPOTrainer, likewise replaced
OVERRIDDEN_PREFERENCE_METHODS = {"tokenize_row": ("self", "feature", "model")}


def compiled_template(template: str):
    """transformers' own compiled Jinja template (the same environment and filters apply_chat_template uses), or
    None if its private compile function moved (the public render_jinja_template is then used, slower)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    return _compile_jinja_template(template)


def rust_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` behind a fast tokenizer (batch encoding without offsets), or None."""
    return getattr(tokenizer, "_tokenizer", None)


def parser_fields(parser) -> set[str]:
    """Every destination an argparse parser fills (argparse lists its actions only in a private attribute):
    the keys a --config file may set."""
    return {action.dest for action in parser._actions}


def batch_sampler_base():
    """The sampler class transformers' Trainer passes as the DataLoader's batch_sampler, unsharded by accelerate
    (it is already rank-aware): sftlab's token-budget sampler subclasses it for that treatment alone."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    return BatchRebalanceSampler


def sft_collator(pad_token_id: int, padding_free: bool):
    """TRL's SFT collator (padding, or one padding-free row with position_ids restarting per sample), from the
    internal module that defines it: TRL does not export it."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id, padding_free=padding_free)


def chunked_logprob():
    """TRL's chunked log-probability kernel (logits tile by tile, gradient folded in place) and the output type
    its fused head returns."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput

    return ChunkedLogProbFunction, FusedCausalLMOutput


def pool_processes(pool) -> list:
    """The worker processes of a concurrent.futures process pool (a private attribute: no public API tells how a
    killed worker ended)."""
    return list((getattr(pool, "_processes", None) or {}).values())


def logging_state(trainer) -> dict:
    """What the Trainer's logging holds between logging steps, which its checkpoints do not keep: the loss summed
    since the last logged step (the mean over processes: a collective), that step, the sum over every logged
    step, and TRL's per-step metrics and token count."""
    from transformers.trainer_pt_utils import nested_gather

    pending = nested_gather(trainer._tr_loss.detach(), trainer.args.parallel_mode).float().mean().item()
    metrics = {key: list(values) for key, values in getattr(trainer, "_metrics", {}).get("train", {}).items()}
    return {"pending_loss": pending, "last_logged_step": trainer._globalstep_last_logged,
            "logged_loss_sum": trainer._total_loss_scalar, "trl_metrics": metrics,
            "total_train_tokens": getattr(trainer, "_total_train_tokens", 0)}


def restore_logging_state(trainer, saved: dict) -> None:
    trainer._tr_loss += saved["pending_loss"]
    trainer._globalstep_last_logged = saved["last_logged_step"]
    trainer._total_loss_scalar = saved["logged_loss_sum"]
    if hasattr(trainer, "_metrics"):
        trainer._metrics["train"].clear()
        trainer._metrics["train"].update(saved["trl_metrics"])
        trainer._total_train_tokens = saved["total_train_tokens"]


def logged_loss_sum(trainer) -> float:
    return trainer._total_loss_scalar


def save_only_adapter(model, name: str) -> None:
    """The PEFT model's save_pretrained, as the Trainer calls it for checkpoints and the final weights, writes only
    the adapter `name`: PEFT writes every adapter a model holds, and TRL's frozen reference copy of an adapter a DPO
    run goes on training is the SFT run's own, already in that run: saved again it would sit in every checkpoint
    as a second adapter (ref/) that a loader could take for the run's."""
    import functools

    model.save_pretrained = functools.partial(model.save_pretrained, selected_adapters=[name])


def set_recorded_name(model, name: str) -> None:
    """The name PEFT writes into adapter_config.json as base_model_name_or_path."""
    model.config._name_or_path = name


def attention_of(model) -> str | None:
    return model.config._attn_implementation


def checkpoint_dir(args, step: int) -> Path:
    """Where the Trainer writes the checkpoint of `step` (sftlab runs no hyperparameter search, so no trial
    folder)."""
    return Path(args.output_dir) / f"checkpoint-{step}"


def load_checkpoint_weights(trainer, folder: str) -> None:
    """The weights of a checkpoint folder loaded into the trainer's model, as a resume loads them (a LoRA adapter, a
    full model, sharded or not): the Trainer's private loader, which handles every layout it writes."""
    trainer._load_from_checkpoint(folder)
