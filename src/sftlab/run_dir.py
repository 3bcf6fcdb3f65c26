"""The run folder's contract: the name of every file sftlab writes into a run folder (and into its eval/ folder),
how JSON and JSON-lines files are read and written, and how a folder is read as a run (its record, its checkpoints,
whether it is complete). train, eval, the doctor, chat, serve, export, the model card, the run report, resume and
estimate use these names and readers, so they cannot disagree about a file; docs/training.md's "What a run
directory holds" lists the same names (tests/test_run_dir.py checks the two against each other).

The weight, tokenizer and generation files are transformers' and PEFT's (loaded in model/load.py).
"""

import json
import os
import re
import tempfile
from pathlib import Path

import yaml

from sftlab.errors import UserError
from sftlab.files import load_yaml, write_atomic

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: a LoRA run's adapter (beside adapter_model.safetensors)
RESOLVED_CONFIG = "sftlab_config.yaml"  # the resolved configuration, written before training
MANIFEST = "manifest.json"  # how the run was made; `completed` once every step after the final save is done
TRAINER_LOG = "trainer_log.jsonl"  # every log record as it happened
TRAINER_STATE = "trainer_state.json"  # the trainer's final state (written with the final weights)
PREDICTIONS = "predictions.jsonl"  # probe replies at every save, and the final ones
HELDOUT = "heldout.jsonl"  # the held-out conversations
REJECTED = "rejected.jsonl"  # every rejected row with its file, line and reason
DATA_REPORT = "data_report.json"  # the cleaning report
RENDER_CHECK = "render_check.json"  # samples as training rendered them, for the doctor
REPORT = "report.md"  # the run report (also the eval folder's comparison)
LOSS_PLOT = "loss_curves.png"
PREFERENCE_PLOT = "preference_curves.png"  # a DPO run's reward margins and accuracy over steps
AMENDMENTS = "amendments.jsonl"  # settings changed on --resume
LOCK = ".sftlab.lock"  # held while a run trains
EVAL_DIR = "eval"  # the held-out evaluation's folder, inside the run folder
RESULTS = "results.json"  # in an eval folder: the scores, and the retention verdict
SAMPLES = "samples.jsonl"  # in an eval folder: every conversation with each model's reply
RETENTION = "retention.jsonl"  # in an eval folder: every general probe, base vs tuned
COMMIT_MARKER = "sftlab_commit.json"  # in a checkpoint: sizes and hashes of its files, written last
LOG_STATE = "sftlab_log_state.json"  # in a checkpoint: the logging state a resume restores
RETENTION_BASE = "retention_base.json"  # the base's replies to the general probes and its losses (retention_at_saves)
RETENTION_RECORD = "sftlab_retention.json"  # in a checkpoint: its retention check (retention_at_saves)

RUN_FILES = (RESOLVED_CONFIG, MANIFEST, TRAINER_LOG, TRAINER_STATE, PREDICTIONS, HELDOUT, REJECTED, DATA_REPORT,
             RENDER_CHECK, REPORT, LOSS_PLOT, PREFERENCE_PLOT, AMENDMENTS, LOCK, RETENTION_BASE)
EVAL_FILES = (RESULTS, REPORT, SAMPLES, RETENTION)
CHECKPOINT_FILES = (COMMIT_MARKER, LOG_STATE, RETENTION_RECORD)


def eval_results(run: Path) -> Path:
    return Path(run) / EVAL_DIR / RESULTS


def damaged(path: Path, what: str) -> UserError:
    """The one line for a file of a run folder that cannot be read: named, and what to do."""
    return UserError(f"{path} is damaged ({what}): restore it, or recreate it with the verb that wrote it")


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} where there is no such file; a file that is not one is a UserError naming it."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged(path, f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise damaged(path, f"a JSON {type(value).__name__} where an object is expected")
    return value


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON-lines file (blank lines skipped), or [] where there is no such file."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise damaged(path, f"not UTF-8 text: {exc}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise damaged(path, f"line {number} is not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise damaged(path, f"line {number} is not a JSON object")
        records.append(record)
    return records


def read_heldout(run: Path) -> list[dict]:
    """A run's held-out rows as conversations ({"messages", "tools"?}), whichever stage wrote them: a DPO run's
    held-out pairs become their prompt and chosen reply, so every verb that wants held-out prompts reads either."""
    rows = []
    for number, record in enumerate(read_jsonl(Path(run) / HELDOUT), 1):
        if "chosen" in record and "prompt" in record:
            chosen = record["chosen"][0] if isinstance(record["chosen"], list) else record["chosen"]
            record = {"messages": [*record["prompt"], chosen], **({"tools": record["tools"]} if "tools" in record
                                                                  else {})}
        if not isinstance(record.get("messages"), list):
            raise damaged(Path(run) / HELDOUT, f"line {number} has no messages (nor a prompt and its replies)")
        rows.append(record)
    return rows


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        return {}
    try:
        value = load_yaml(path)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise damaged(path, f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(value, dict):  # sftlab writes a mapping: an empty file was cut short
        raise damaged(path, "empty" if value is None else f"a YAML {type(value).__name__} where a mapping is expected")
    return value


def write_json(path: Path, value, indent: int | None = 2) -> None:
    """Written whole under a temporary name, then renamed: never half a file."""
    write_atomic(path, json.dumps(value, ensure_ascii=False, indent=indent, default=str) + "\n")


def write_jsonl(path: Path, records) -> None:
    """A line per record, streamed to a temporary name and renamed (records may be a lazy sequence of any
    length: the file is never built in memory)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_yaml(path: Path, value: dict) -> None:
    write_atomic(path, yaml.safe_dump(value, allow_unicode=True, sort_keys=False))


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Appends whole lines: a crash loses at most the line being written, never earlier ones."""
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def keep_lines(path: Path, keep) -> None:
    """Rewrites a JSON-lines file with only the records `keep` accepts (atomically)."""
    path = Path(path)
    if path.exists():
        lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                 if line.strip() and keep(json.loads(line))]
        write_atomic(path, "".join(lines))


def check_output_folder(out: Path, verb: str, flag: str = "--output", ours: tuple = (), inputs: tuple = ()) -> None:
    """Refuses an output folder that would overwrite what the user did not hand over: a file, a folder holding an
    input, or a folder holding anything but `ours` (the names the verb writes there: its own previous output is
    replaced, nothing else is). Called before any work, so a refusal costs nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder: choose a folder (it is created)")
    for source in inputs:
        source = Path(source)
        if source.exists() and source.resolve().is_relative_to(out.resolve()):  # the folder itself, or inside it
            raise UserError(f"{flag} {out} holds an input of this command ({source}): choose another folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:  # a folder that cannot be written is said now, not after minutes of work
        os.rmdir(tempfile.mkdtemp(prefix=".sftlab-write-check-", dir=existing))
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(out)) from None
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if others:
            listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise UserError(f"{flag} {out} already holds files `sftlab {verb}` did not write ({listed}): choose "
                            "another folder, or empty it")


# Reading a run folder: what a folder is (a run, a checkpoint of one, an adapter), what its run recorded, and
# whether it finished. Every verb that takes a run asks these, so a checkpoint is read as its run everywhere.

def is_adapter_folder(folder: str | Path) -> bool:
    """A PEFT adapter folder (a LoRA run), not a full model."""
    return (Path(folder) / ADAPTER_CONFIG).exists() and not (Path(folder) / "config.json").exists()


def run_of_checkpoint(folder: str | Path) -> Path | None:
    """The run folder that holds `folder` when `folder` is one of its checkpoint-N folders, else None: a
    checkpoint's metadata (recipe, stop ids, data report) is its run's, and nothing is written inside it."""
    folder = Path(folder)
    if re.fullmatch(r"checkpoint-\d+", folder.name) and (folder.parent / RESOLVED_CONFIG).exists():
        return folder.parent
    return None


def run_folder(folder: str | Path) -> Path | None:
    """The training run `folder` belongs to: itself, or the run holding it when it is a checkpoint-N; None for a
    model folder that sftlab did not train."""
    folder = Path(folder)
    return folder if (folder / RESOLVED_CONFIG).is_file() else run_of_checkpoint(folder)


def run_record(folder: str | Path | None) -> dict | None:
    """The resolved config (sftlab_config.yaml) of the run `folder` belongs to, or None."""
    run = run_folder(folder) if folder is not None else None
    if run is None:
        return None
    return read_yaml(run / RESOLVED_CONFIG)


def recorded_system_prompt(folder: str | Path | None) -> str | None:
    """The system_prompt a training run was given (None: unset, or no run record in `folder`): chat, the probes
    and serve put it before conversations without a system message, as training did."""
    return ((run_record(folder) or {}).get("data") or {}).get("system_prompt")


def recorded_reply_limit(folder: str | Path | None) -> int | None:
    """The reply limit a run's final evaluation used (twice the p99 of its training replies, or what its config
    set), or None for a folder that is not a run: eval and the doctor generate up to it."""
    limit = ((run_record(folder) or {}).get("train") or {}).get("final_eval_max_new_tokens")
    return int(limit) if limit else None


def has_final(out: Path) -> bool:
    out = Path(out)
    return (out / ADAPTER_CONFIG).exists() or ((out / "config.json").exists() and (out / "model.safetensors").exists())


def is_complete(out: Path) -> bool:
    """Final weights saved and every step after them done (the manifest is marked complete last of all)."""
    path = Path(out) / MANIFEST
    if not has_final(out) or not path.exists():
        return False
    try:
        # a run from before sftlab marked completion: finished when its report was written
        return read_json(path).get("completed", (Path(out) / REPORT).exists()) is True
    except ValueError:
        return False


def mark_complete(out: Path) -> None:
    write_json(Path(out) / MANIFEST, {**read_json(Path(out) / MANIFEST), "completed": True})


def effective_record(out: Path) -> dict:
    """The run's sftlab_config.yaml with the amendments of its resumes applied."""
    record = read_yaml(Path(out) / RESOLVED_CONFIG)
    for amendment in read_jsonl(Path(out) / AMENDMENTS):
        for key, (_, value) in amendment["changed"].items():
            section, _, name = key.partition(".")
            if name:
                record[section][name] = value
    return record


DEFAULT_STAGE = "sft"  # the stage of a run record without a `stage` (SFT's record none)


def stage_of(record: dict) -> str:
    """The training stage (train/stage.py) a run's record (sftlab_config.yaml) names."""
    return record.get("stage", DEFAULT_STAGE)


def recorded_stage(folder: str | Path) -> str:
    """The training stage of the run `folder` belongs to, by its record."""
    return stage_of(run_record(folder) or {})


def stage_verb(stage: str) -> str:
    """The command that starts and resumes a stage's runs: `sftlab <stage>`, SFT's `sftlab train`."""
    return "sftlab train" if stage == DEFAULT_STAGE else f"sftlab {stage}"


def stage_title(stage: str) -> str:
    """How a message names a stage's runs: "an SFT run", "a DPO run"."""
    return f"{'an' if stage.upper()[0] in 'AEFHILMNORSX' else 'a'} {stage.upper()} run"


# What a run's stage says of itself (train/stage.py's Stage.describe), in its manifest under "stage": the model card's
# title and training rows, and the run report's loss label. A manifest without one is an SFT run's.
SFT_DESCRIPTION = {"title": "Supervised fine-tuning", "loss": "loss (supervised tokens)", "settings": {}}


def stage_description(manifest: dict) -> dict:
    return manifest.get("stage") or SFT_DESCRIPTION
