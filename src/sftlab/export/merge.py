"""`sftlab merge`: a LoRA run merged into its base, written as a plain transformers model folder that any
serving engine loads (vLLM, TGI, SGLang, llama.cpp's converter): safetensors shards, the tokenizer with the chat
template the run was trained with, the run's generation config (all its stop ids) and a model card.

Written into a temporary folder beside the output and renamed into place, so a crash never leaves a folder
that looks complete; a tensor with a NaN or an infinity is refused by name."""

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sftlab.config import check_fields
from sftlab.errors import UserError
from sftlab.eval.model_card import write_model_card
from sftlab.files import staged_folder
from sftlab.model.load import inference_paths, load_model, load_tokenizer
from sftlab.model.saving import save_tokenizer
from sftlab.run_dir import RESOLVED_CONFIG, check_output_folder, run_of_checkpoint

DTYPES = ("bfloat16", "float16", "float32")  # MergeArguments.dtype's choices


def merge(adapter: str, output: str | None = None, dtype: str = "bfloat16", device: str = "cpu",
          max_shard_size: str = "5GB") -> Path:
    """Merges the LoRA adapter of run folder `adapter` into its base; returns the merged folder."""
    from peft import PeftModel

    run = Path(adapter)
    # a checkpoint (RUN/checkpoint-N) is merged with its run's recipe, stop ids and card, into RUN-checkpoint-N-merged
    record = run_of_checkpoint(run) or run
    default = (record.with_name(f"{record.name}-{run.name}-merged") if record != run
               else run.with_name(run.name + "-merged"))
    out = Path(output) if output else default
    check_output_folder(out, "merge", inputs=[adapter])
    if dtype not in DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    base_path, tokenizer_dir = inference_paths(adapter=adapter)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_model(base_path, dtype, device=device)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    refuse_non_finite_tensors(model)
    with staged_folder(out) as staging:  # a killed merge's leftovers are removed first
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        save_tokenizer(tokenizer, staging)
        # the run's stop ids (the base's may lack the template's): the checkpoint's own, else its run's
        stops = next((f / "generation_config.json" for f in (run, record) if (f / "generation_config.json").exists()),
                     None)
        if stops is not None:
            shutil.copy(stops, staging / "generation_config.json")
        if (record / RESOLVED_CONFIG).exists():  # the recipe, and the system_prompt chat and serve apply as trained
            shutil.copy(record / RESOLVED_CONFIG, staging / RESOLVED_CONFIG)
        write_model_card(record, staging, merged=True, name=out.name,
                         checkpoint=run.name if record != run else None)
    return out


def refuse_non_finite_tensors(model) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise UserError(f"refusing to merge: {name} has {bad} non-finite values of {tensor.numel()} "
                            "(the adapter or the base holds NaN or infinity)")


@dataclass
class MergeArguments:
    adapter: str = field(metadata={"help": "A LoRA run folder (its base is read from it)."})
    output: str | None = field(default=None, metadata={
        "help": "Merged model folder (default: the run folder's name + -merged)."})
    dtype: Literal["bfloat16", "float16", "float32"] = field(default="bfloat16", metadata={
        "help": "Dtype of the merged weights."})
    device: str = field(default="cpu", metadata={"help": "Where to merge (cpu needs the base's size in RAM)."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard."})

    def __post_init__(self):
        check_fields(self)


ARGUMENTS = (MergeArguments,)  # `sftlab merge`'s (cli.py parses them)


def run(args: MergeArguments) -> int:
    if not Path(args.adapter).is_dir():
        raise UserError(f"adapter path {args.adapter} does not exist")
    out = merge(args.adapter, args.output, args.dtype, args.device, args.max_shard_size)
    print(f"merged {args.adapter} into {out} ({args.dtype}): load it with transformers, vLLM (vllm serve {out}), "
          f"or check it with: sftlab doctor --model {out}")
    return 0
