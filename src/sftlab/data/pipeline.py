"""sftlab's reader, checks and tokenizer as datatrove pipeline steps, for data that one process or one machine
cannot clean in time. datatrove runs them (LocalPipelineExecutor on one machine, SlurmPipelineExecutor or
RayPipelineExecutor across machines): sftlab has no scheduler of its own.

Two stages, so that the result is the one a single process gives:
  1. check, in N tasks: every task reads the rows (any format sftlab reads, columns and max_samples applied), and
     task r checks and renders batches r, r + N, r + 2N, ... of them (repairs, filters, tokenization, duplicate
     hashes and MinHash signatures: the per-row work, nearly all the time), writing the results to
     `checked/TASK.pkl` in FOLDER, a folder every task can reach.
  2. decide, in one task: the batches in order, through the same cross-row decisions as the single-process path
     (exact and near duplicates, the first occurrence winning) and the same outputs (`sftlab data clean`'s files,
     or the prepared shards `sftlab train` reads).
Every task reads and parses every row (a row is read far faster than it is checked and tokenized); with many
tasks, give datasets as several files, which are read in parallel in any case."""

import itertools
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments
from sftlab.data.clean import RowChecker
from sftlab.data.cleaner import batches_of
from sftlab.data.sources import dataset_specs, iter_datasets
from sftlab.files import write_atomic
from sftlab.model.load import load_tokenizer, resolve_model_path

CHECKED = "checked"  # in FOLDER: a file of check results per task, and the datasets' counts
STATS = "datasets.json"


class ReadRows(PipelineStep):
    """datatrove reader: the rows of sftlab's datasets, as one Document per row of this task's batches."""

    name, type = "sftlab rows", "📖 - READER"

    def __init__(self, inputs: list, folder: str, split_seed: int, max_row_bytes: int):
        super().__init__()
        self.inputs, self.folder, self.split_seed, self.max_row_bytes = inputs, folder, split_seed, max_row_bytes

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        stats = {}
        rows = iter_datasets(dataset_specs(self.inputs), self.split_seed, stats, self.max_row_bytes)
        for index, batch in enumerate(batches_of(rows)):
            if index % world_size == rank:
                self.stat_update("rows", value=len(batch))
                for row in batch:
                    yield Document(text="", id=f"{row.source}:{row.line}", metadata={"row": row, "batch": index})
        if rank == 0:  # every task counted the same; one writes it
            write_atomic(Path(self.folder) / CHECKED / STATS, json.dumps(stats, ensure_ascii=False))


class CheckRows(PipelineStep):
    """datatrove filter and tokenizer: sftlab's per-row checks and rendering (RowChecker), a batch at a time, as one
    Document per batch holding its rows and their results."""

    name, type = "sftlab checks and tokenizer", "🔻 - FILTER"

    def __init__(self, clean_args: dict, model: str | None, max_length: int, overflow: str,
                 system_prompt: str | None, enabled: bool = True):
        super().__init__()
        self.clean_args, self.model, self.max_length, self.overflow = clean_args, model, max_length, overflow
        self.system_prompt, self.enabled = system_prompt, enabled

    def run(self, data: Iterator[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        renderer = (ChatRenderer(load_tokenizer(resolve_model_path(self.model)), self.max_length, self.overflow)
                    if self.model else None)
        checker = RowChecker(CleanArguments(**self.clean_args), renderer, self.system_prompt, self.enabled)
        for index, documents in itertools.groupby(data, key=lambda document: document.metadata["batch"]):
            rows = [document.metadata["row"] for document in documents]
            with self.track_time("batch"):
                outcome = checker.check_batch(rows)
            self.stat_update("batches")
            yield Document(text="", id=f"batch-{index}", metadata={"batch": index, "rows": rows, "outcome": outcome})


class WriteChecked(PipelineStep):
    """datatrove writer: this task's check results, in batch order, to checked/TASK.pkl (under its name only once
    complete; datatrove does not run a completed task again)."""

    name, type = "sftlab check results", "💽 - WRITER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: Iterator[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        path = Path(self.folder) / CHECKED / f"{rank:05d}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.tmp", "wb") as f:
            for document in data:
                pickle.dump((document.metadata["batch"], document.metadata["rows"], document.metadata["outcome"]), f,
                            protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(f"{path}.tmp", path)
        return iter(())


def check_steps(inputs: list, folder: str, clean_args: CleanArguments, model: str | None, max_length: int,
                overflow: str = "drop", system_prompt: str | None = None, split_seed: int = 42) -> list[PipelineStep]:
    """Stage 1, for any datatrove executor (the executor's `tasks` is the N that checked_batches reads back)."""
    return [ReadRows(inputs, str(folder), split_seed, clean_args.max_row_bytes),
            CheckRows(asdict(clean_args), model, max_length, overflow, system_prompt, clean_args.clean),
            WriteChecked(str(folder))]


def start_stage(folder: Path, tasks: int) -> str:
    """Readies FOLDER for stage 1 with `tasks` tasks and returns datatrove's logging folder in it. Results of a
    stage 1 with another task count (an interrupted run started again with another N) are removed: the batches
    are dealt among the tasks by that count."""
    folder, logs = Path(folder), Path(folder) / "datatrove-logs"
    count = folder / CHECKED / "tasks"
    if count.exists() and count.read_text() != str(tasks):
        shutil.rmtree(folder / CHECKED)
        shutil.rmtree(logs, ignore_errors=True)
    count.parent.mkdir(parents=True, exist_ok=True)
    count.write_text(str(tasks))
    return str(logs)


def run_locally(steps: list[PipelineStep], folder: Path, tasks: int, workers: int | None) -> None:
    """Stage 1 on this machine: datatrove's LocalPipelineExecutor, `workers` tasks at a time (default: a core
    each). Its logs, stats and completions go to FOLDER/datatrove-logs; a completed task is not run again."""
    logs = start_stage(folder, tasks)
    LocalPipelineExecutor(pipeline=steps, tasks=tasks, workers=workers or min(tasks, os.cpu_count() or 1),
                          logging_dir=logs, start_method="fork").run()


def checked_batches(folder: Path, tasks: int) -> Iterator[tuple[list, tuple]]:
    """(batch, its check results) in input order, from the task files stage 1 wrote: batch b is task b % tasks's
    (b // tasks)-th, so reading the files in turn restores the order."""
    missing = [rank for rank in range(tasks) if not (Path(folder) / CHECKED / f"{rank:05d}.pkl").exists()]
    if missing:
        raise FileNotFoundError(f"{folder}/{CHECKED}: no results of task(s) {missing[:5]} of {tasks}: stage 1 did "
                                "not complete")
    files = [open(Path(folder) / CHECKED / f"{rank:05d}.pkl", "rb") for rank in range(tasks)]
    try:
        for index in itertools.count():
            try:
                batch_index, rows, outcome = pickle.load(files[index % tasks])
            except EOFError:
                return
            if batch_index != index:  # written by a stage 1 of another task count
                raise ValueError(f"{folder}/{CHECKED}: task {index % tasks} holds batch {batch_index} where batch "
                                 f"{index} belongs: its results are not of {tasks} tasks; remove {CHECKED}/ and "
                                 "datatrove-logs/ and run again")
            yield rows, outcome
    finally:
        for f in files:
            f.close()


def dataset_counts(folder: Path) -> dict:
    """The per-dataset counts stage 1's first task wrote (rows read, not sampled, weight, sources)."""
    return json.loads((Path(folder) / CHECKED / STATS).read_text(encoding="utf-8"))
