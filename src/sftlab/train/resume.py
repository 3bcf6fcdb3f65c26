"""Starting or resuming a run in an output_dir: never over an old run, never from a torn checkpoint, never
with a changed recipe.

A resumed run must be the run that was started: the data (by content hash), the model, the LoRA shape, the
length limit, the seeds, the learning-rate schedule and the effective batch are checked against the run's own
sftlab_config.yaml before anything in the folder is written. Changes that cannot make the finished model
differ from an uninterrupted run of the new settings (logging, probes, evaluation and saving frequency, more
epochs) are allowed and appended to amendments.jsonl; the original record is never overwritten.
"""

import json
import shutil
from pathlib import Path

import yaml

from sftlab.errors import UserError
from sftlab.files import append_jsonl, write_atomic
from sftlab.model.load import ADAPTER_CONFIG, RUN_CONFIG
from sftlab.train.checkpoints import checkpoints, newest_committed

RESOLVED_CONFIG = RUN_CONFIG  # sftlab_config.yaml
AMENDMENTS = "amendments.jsonl"
# fields whose change makes a resumed run a different run ("section.field" of the resolved config)
PROTECTED = {
    "model." + name for name in ("model_name_or_path", "dtype", "load_in_4bit", "attn_implementation", "use_peft",
                                 "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save")
} | {
    "data." + name for name in ("data_files", "test_size", "split_seed", "system_prompt", "overflow")
} | {
    "train." + name for name in ("max_length", "seed", "data_seed", "learning_rate", "lr_scheduler_type",
                                 "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay", "optim",
                                 "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "max_steps",
                                 "per_device_train_batch_size", "gradient_accumulation_steps",
                                 "max_tokens_per_batch", "padding_free", "supervised_head", "bf16", "fp16")
} | {"world_size", "data_fingerprint"}
IGNORED = {"train.resume", "train.output_dir", "train.logging_dir"}


def has_final(out: Path) -> bool:
    return (out / ADAPTER_CONFIG).exists() or ((out / "config.json").exists() and (out / "model.safetensors").exists())


def check_output_dir(out: Path, resume: bool, is_main: bool = True) -> str | None:
    """The committed checkpoint to resume from, or None for a fresh run. Never silently trains over an old run;
    the leftovers of a run killed before its first checkpoint was committed are cleared (by the main process)
    with a line."""
    out = Path(out)
    committed, skipped = newest_committed(out)
    if resume:
        for line in skipped if is_main else []:
            print(f"resume: skipping {line}")
        if committed is None:
            reasons = f" ({'; '.join(skipped)})" if skipped else ""
            raise UserError(f"--resume: no committed checkpoint in {out}{reasons}; run without --resume to start "
                            "again")
        return str(committed)
    if committed is not None or has_final(out):
        raise UserError(f"output_dir {out} already holds a run: pass --resume to continue it, "
                        "or choose another output_dir")
    torn = checkpoints(out) if is_main else []
    if torn:
        print(f"output_dir {out}: removing {len(torn)} uncommitted checkpoint(s) of an interrupted run "
              f"({', '.join(p.name for p in torn)}) and starting again")
        for folder in torn:
            shutil.rmtree(folder, ignore_errors=True)
    for name in ("trainer_log.jsonl", "predictions.jsonl", AMENDMENTS) if is_main else ():
        (out / name).unlink(missing_ok=True)  # an interrupted run's records; this run writes its own
    return None


def flatten(config: dict) -> dict:
    flat = {}
    for section, values in config.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def config_drift(original: dict, new: dict) -> tuple[list[str], dict]:
    """(protected fields that changed, as "field: old -> new" lines; the allowed changes {field: [old, new]})."""
    before, after = flatten(original), flatten(new)
    blocking, allowed = [], {}
    for key in sorted(set(before) | set(after)):
        old, value = before.get(key), after.get(key)
        if key in IGNORED or _same(old, value):
            continue
        epochs_down = key == "train.num_train_epochs" and (value or 0) < (old or 0)
        if key in PROTECTED or epochs_down:
            blocking.append(f"{key.split('.', 1)[-1]}: {old!r} -> {value!r}")
        else:
            allowed[key] = [old, value]
    return blocking, allowed


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def check_resume_config(out: Path, config: dict, step: int, record: bool = True) -> None:
    """Raises UserError naming every protected field that differs from the run's record; records the allowed
    changes as an amendment (not by rewriting the record)."""
    recorded = yaml.safe_load((Path(out) / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    blocking, allowed = config_drift(recorded, config)
    if blocking:
        raise UserError(f"--resume with a changed recipe: {'; '.join(blocking)}. Resume with the run's own settings "
                        f"({out / RESOLVED_CONFIG}), or start a new run in another output_dir")
    if allowed and record:
        append_jsonl(Path(out) / AMENDMENTS, [{"resumed_at_step": step, "changed": allowed}])
        print(f"resume: amended {', '.join(k.split('.', 1)[-1] for k in allowed)} (recorded in {AMENDMENTS})")


def forget_after(out: Path, step: int) -> None:
    """On resume, drops the log and probe lines that the interrupted run wrote after its checkpoint: the
    resumed run writes those steps again, and each step should be in the logs once."""
    for name in ("trainer_log.jsonl", "predictions.jsonl"):
        path = Path(out) / name
        if path.exists():
            lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                     if line.strip() and json.loads(line)["step"] <= step]
            write_atomic(path, "".join(lines))
