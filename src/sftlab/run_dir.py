"""The run folder's contract: the name of every file sftlab writes into a run folder (and into its eval/ folder),
and how JSON and JSON-lines files are read and written. train, eval, the doctor, the model card, the run report,
resume and estimate use these names and readers, so they cannot disagree about a file; the README's "What a run
directory holds" lists the same names (tests/test_run_dir.py checks the two against each other).

The weight, tokenizer and generation files are transformers' and PEFT's (named in model/load.py).
"""

import json
import os
from pathlib import Path

import yaml

from sftlab.files import write_atomic

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


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} where there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON-lines file (blank lines skipped), or [] where there is no such file."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_yaml(path: Path) -> dict:
    path = Path(path)
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}


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
