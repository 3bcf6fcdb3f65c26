"""Starting or resuming a run in an output_dir: never over an old run, never from a torn checkpoint, never
with a changed recipe.

A resumed run must be the run that was started: the data (by content hash), the model, the LoRA shape, the
length limit, the seeds, the learning-rate schedule and the effective batch are checked against the run's own
sftlab_config.yaml before anything in the folder is written. Only the changes on an allow-list (AMENDABLE:
logging, probes, evaluation and saving, tracking) are accepted, appended to amendments.jsonl once training has
resumed with them; the original record is never overwritten.
"""

import json
import shutil
from pathlib import Path

from sftlab.errors import UserError
from sftlab.run_dir import (
    AMENDMENTS,
    PREDICTIONS,
    RESOLVED_CONFIG,
    RETENTION_BASE,
    TRAINER_LOG,
    append_jsonl,
    has_final,
    keep_lines,
    read_yaml,
    stage_of,
    stage_title,
    stage_verb,
)
from sftlab.train.checkpoints import checkpoints, newest_committed

# the only fields a resume may change ("section.field" of the resolved config): they decide what is logged,
# evaluated, saved, tracked and probed, or how data is fed, never what is learned. Any other change is refused
# naming the field: an allow-list, so a field that a new transformers or TRL adds is refused until judged here.
AMENDABLE = {"clean.num_proc"} | {
    "train." + name for name in (
        # logging and tracking
        "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
        "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name",
        "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "skip_memory_metrics",
        # evaluation during training
        "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only",
        "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
        "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "eval_packing",
        # saving and publishing
        "save_strategy", "save_steps", "save_on_each_node", "save_total_limit", "push_to_hub", "hub_token",
        "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
        # feeding the data (the order and the batches are the sampler's, under the seed)
        "dataloader_num_workers", "dataloader_persistent_workers", "dataloader_prefetch_factor",
        "dataloader_pin_memory", "dataset_num_proc", "ddp_timeout", "torch_empty_cache_steps",
        # sftlab's probes, final evaluation and guard
        "probe_prompts", "probe_max_new_tokens", "final_eval_samples", "final_eval_max_new_tokens",
        "retention_check", "max_bad_steps",
    )
}
IGNORED = {"train.resume", "train.output_dir", "train.local_rank"}


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
    for name in (TRAINER_LOG, PREDICTIONS, AMENDMENTS, RETENTION_BASE) if is_main else ():
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
    """(refused changes, as "field: old -> new" lines, a changed data file by its name; the allowed changes
    {field: [old, new]})."""
    was, now = stage_of(original), stage_of(new)
    if was != now:  # every other field differs too: one line says it
        return [f"this run is {stage_title(was)}; this command is for {stage_title(now)} (resume it with "
                f"`{stage_verb(was)}`)"], {}
    before, after = flatten(original), flatten(new)
    blocking, allowed = [], {}
    for key in sorted(set(before) | set(after)):
        old, value = before.get(key), after.get(key)
        if key in IGNORED or _same(old, value):
            continue
        if key in AMENDABLE:
            allowed[key] = [old, value]
        elif key.startswith("data_sources."):
            if old is not None and value is not None:  # a file added or removed shows as data_files
                blocking.append(f"data file {key.split('.', 1)[1]} changed since the run started (its content "
                                "differs)")
        elif key == "data_fingerprint":
            if not any(k.startswith("data_sources.") and not _same(before.get(k), after.get(k)) for k in after):
                blocking.append("the prepared data differs though no data file changed (the tokenizer, its chat "
                                "template, the cleaning settings or sftlab's version changed)")
        elif key in ("train.num_train_epochs", "train.max_steps"):
            blocking.append(f"{key.split('.', 1)[1]}: {old!r} -> {value!r} (the learning-rate schedule of the steps "
                            "already taken depends on it; start a new run, or train on from this run's adapter in "
                            "another output_dir)")
        else:
            blocking.append(f"{key.split('.', 1)[-1]}: {old!r} -> {value!r}")
    return blocking, allowed


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def check_resume_config(out: Path, config: dict, step: int) -> dict | None:
    """Raises UserError naming every refused change against the run's record; returns the allowed changes as an
    amendment for record_amendment (the record itself is never rewritten)."""
    recorded = read_yaml(Path(out) / RESOLVED_CONFIG)
    blocking, allowed = config_drift(recorded, config)
    if blocking:
        raise UserError(f"--resume with a changed recipe: {'; '.join(blocking)}. Only logging, evaluation, saving, "
                        f"tracking and probe settings may change on resume: resume with the run's own settings "
                        f"({out / RESOLVED_CONFIG}), or start a new run in another output_dir")
    return {"resumed_at_step": step, "changed": allowed} if allowed else None


def resume_or_start(out: Path, config: dict, resume_from: str | None, is_main: bool, write_inputs) -> dict | None:
    """A resume: the recorded config checked against `config` on every process (the others would wait forever for
    a main that stopped), the logs newer than the checkpoint dropped, and the allowed changes returned as the
    amendment. A fresh run: `write_inputs()` on the main process. Before training, in every stage."""
    if resume_from:
        step = int(Path(resume_from).name.split("-")[-1])
        amendment = check_resume_config(out, config, step)
        if is_main:
            forget_after(out, step)
        return amendment
    if is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_inputs()
    return None


def record_amendment(out: Path, amendment: dict | None) -> None:
    """Called once training has resumed with the amended settings (not when the resume fails before)."""
    if amendment:
        append_jsonl(Path(out) / AMENDMENTS, [amendment])
        names = ", ".join(k.split(".", 1)[-1] for k in amendment["changed"])
        print(f"resume: amended {names} (recorded in {AMENDMENTS})")


def forget_after(out: Path, step: int) -> None:
    """On resume, drops the log and probe lines that the interrupted run wrote after its checkpoint, and the
    summary record of a run stopped by a signal: the resumed run writes those steps again, and its own summary,
    and each should be in the logs once."""
    keep_lines(Path(out) / TRAINER_LOG, lambda r: r["step"] <= step and "train_runtime" not in r)
    keep_lines(Path(out) / PREDICTIONS, lambda r: r["step"] <= step)
