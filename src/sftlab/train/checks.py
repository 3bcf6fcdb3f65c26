"""What is refused before a run loads its model or trains: LoRA targets that match nothing, a tied embedding
trained in full, a max_length past the model's context, prepared data that cannot train as configured. Each one is
a line naming the setting and what to change (on the meta device: nothing is loaded)."""

from pathlib import Path

import torch

from sftlab.config import ModelArguments
from sftlab.errors import UserError
from sftlab.model.load import meta_model, model_context


def check_lora_targets(model_path: Path, model_args: ModelArguments) -> None:
    """Every LoRA target names a module of the model, and no module trained in full is tied to another
    (checked on the meta device: nothing is loaded)."""
    checks_targets = model_args.lora_target_modules != ["all-linear"]
    if not model_args.use_peft or not (checks_targets or model_args.lora_modules_to_save):
        return
    model = meta_model(model_path)
    refuse_tied_modules_to_save(model, model_args.lora_modules_to_save or [])
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [t for t in model_args.lora_target_modules if t not in names] if checks_targets else []
    if missing:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"lora_target_modules: {', '.join(missing)} matches no module of the model; its linear "
                        f"layers are {', '.join(linear)} (or use all-linear)")


def check_context(model_path: Path, max_length: int | None) -> None:
    """max_length within the model's context (max_position_embeddings): past it, positions the model never saw."""
    context = model_context(model_path)
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



def check_training_rows(data, data_args) -> None:
    """Training samples are left (`sftlab data prepare` says so too, rather than that `train` can read it)."""
    if not len(data.train):
        if len(data.test):
            raise UserError(f"test_size {data_args.test_size} leaves no training samples: all {len(data.test)} usable "
                            "rows were held out; lower test_size (a share of the rows, e.g. 0.05)")
        raise UserError(f"no training samples left from {', '.join(map(str, data_args.data_files))} "
                        f"({data.summary()})")


def check_prepared(data, lengths: list[int], data_args, train_args) -> None:
    """The prepared data can train as configured: samples left, a token budget that holds the longest sample
    (`lengths`: the training samples'), a held-out split where evaluation is asked for."""
    check_training_rows(data, data_args)
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
