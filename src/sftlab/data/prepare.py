"""Data files -> cleaned, rendered train and held-out samples, as Arrow shards cached under a content hash.

The cache key covers the data files' bytes, the tokenizer and its chat template, max_length, the cleaning
config and the split, so a second run (and every process of a multi-process run) reuses the result, and any
change to one of them prepares the data again.

Preparation streams: rows are read, cleaned and rendered a batch at a time, and the kept samples are appended to
Arrow shards (one per SHARD_BATCHES batches of rows read), so memory does not grow with the number of rows. The
work happens in a `.KEY.partial` folder; after every shard the duplicate state and a progress record are
committed together, so an interrupted preparation (killed, out of disk, a --strict stop) resumes after its last
complete shard. When every row is read, the split and the dataset weights are applied as index arrays and the
folder is renamed to KEY, with prepared.json (written last) and manifest.json (each shard's rows, tokens and
SHA-256). Training reads the shards memory-mapped (datasets' Dataset.from_file), concatenated without a copy."""

import hashlib
import itertools
import json
import os
import random
import shutil
import sys
from collections.abc import Sequence
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset
from tqdm.auto import tqdm

from sftlab import __version__, chat_format
from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments, DataArguments
from sftlab.data import clean, cleaner, convert, dedup, lengths, load, near_dedup
from sftlab.data import shards as shard_files
from sftlab.data import sources as dataset_sources
from sftlab.data.clean import CleanResult, RowChecker
from sftlab.data.cleaner import Cleaner, checked_batches, dedup_store
from sftlab.data.dedup import remove_store
from sftlab.data.load import expand_inputs
from sftlab.data.report import build_report, dataset_rows, replay_line, summary_line
from sftlab.data.shards import (
    COLUMNS,
    KINDS,
    DamagedShard,
    ShardWriter,
    column_of,
    open_shards,
    rows_at,
    shard_intact,
    size_on_disk,
)
from sftlab.data.sources import dataset_specs, iter_datasets
from sftlab.environment import cache_root
from sftlab.errors import UserError, interrupt_note
from sftlab.files import exclusive_lock, release_lock, remove_stale_staging, write_atomic

SHARD_BATCHES = 128  # batches of rows read (clean.BATCH_ROWS each: 65,536 rows) per shard


class Conversations(Sequence):
    """The held-out conversations ({"messages", "tools"?}), read from the memory-mapped shards when used."""

    def __init__(self, rows: Dataset):
        self.rows = rows  # a Dataset with a "conversation" column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [json.loads(text) for text in self.rows[index]["conversation"]]
        return json.loads(self.rows[index]["conversation"])

    def __iter__(self):
        for batch in self.rows.iter(batch_size=1024):
            yield from map(json.loads, batch["conversation"])

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)


@dataclass
class PreparedData:
    train: "Dataset"  # columns input_ids, labels, length (tokens), num_supervised
    test: "Dataset"
    heldout: Conversations  # the held-out conversations, {"messages", "tools"} (tools where there are any)
    rejected: Path  # rejected.jsonl: {"reason", "source", "line", "detail"} per rejected row
    report: dict
    fingerprint: str  # the content hash the prepared data is cached under
    examples: list[dict]  # the first training sample of each kind present, as rendered, for `sftlab doctor`
    sources: dict[str, str]  # each data file's SHA-256 (a resume names the file that changed)
    folder: Path  # where it is: shards/, manifest.json, rejected.jsonl, prepared.json

    def summary(self) -> str:
        datasets = self.report.get("datasets", {})
        mix = "".join(f"\n  {name}: {d['kept']} kept, weight {d['weight']:g}, {d['train_rows']} training rows"
                      for name, d in datasets.items()) if len(datasets) > 1 else ""
        replay = f"\n{replay_line(self.report)}" if self.report.get("replay") else ""
        return summary_line(self.report) + f"; {len(self.train)} train, {len(self.test)} held out" + mix + replay


def split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split, identical in every process (the tutorial's was unseeded, so test rows leaked). As int64
    arrays (8 bytes a row); random.shuffle on the array draws what it draws on a list."""
    order = np.arange(n, dtype=np.int64)
    random.Random(seed).shuffle(order)
    n_test = 0 if test_size == 0 or n < 2 else max(1, round(n * test_size))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


NOT_PREPARED = ("the data is not prepared for this run, and a multi-process run does not prepare it (every process "
                "would wait for one): run `sftlab data prepare` with the same config first (same data, model, "
                "max_length and cleaning settings; prepared data is found by their content hash), then launch again")


def work_folder(data_args: DataArguments, clean_args: CleanArguments, renderer: ChatRenderer) -> Path:
    """Where the preparation of this data happens (its `.KEY.partial` folder): datatrove tasks on other machines
    write their check results there (sftlab.data.pipeline), so it must be on a filesystem they all reach."""
    specs = dataset_specs(data_args.data_files)
    sources = [source for spec in specs for source in expand_inputs([spec.path])]
    key = cache_key(source_digests(sources), data_args, clean_args, renderer)
    return cache_root() / "datasets" / f".{key}.partial"


def prepare_data(data_args: DataArguments, clean_args: CleanArguments, renderer: ChatRenderer,
                 cached_only: bool = False) -> PreparedData:
    """The prepared data, from the cache when it is there (else prepared, or its interrupted preparation
    resumed). `cached_only`: for the processes of a multi-process run, which read prepared data and never
    prepare it."""
    specs = dataset_specs(data_args.data_files)
    sources = [source for spec in specs for source in expand_inputs([spec.path])]
    digests = source_digests(sources)
    key = cache_key(digests, data_args, clean_args, renderer)
    cached = cache_root() / "datasets" / key
    if (cached / META).exists():
        data = read_cache(cached)
        if data is not None:
            return data
    if cached_only:
        raise UserError(f"{NOT_PREPARED} (no {cached})")
    partial = cached.with_name(f".{key}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    # one preparation per key; a second waits, then reads its result
    lock = exclusive_lock(partial / ".lock", waiting_for=f"another process preparing the same data ({key})")
    try:
        if (cached / META).exists():  # another process prepared it while this one waited for the lock
            shutil.rmtree(partial, ignore_errors=True)
        else:
            remove_stale_staging(cached.parent)  # what an older sftlab's killed preparation left behind
            try:
                build(partial, specs, sources, digests, key, data_args, clean_args, renderer)
            except DamagedShard as exc:
                print(f"{exc}: preparing the data again from the start")
                for item in partial.iterdir():
                    if item.name != ".lock":
                        shutil.rmtree(item) if item.is_dir() else item.unlink()
                build(partial, specs, sources, digests, key, data_args, clean_args, renderer)
            shutil.rmtree(cached, ignore_errors=True)  # what is left of a damaged one
            os.replace(partial, cached)
    finally:
        release_lock(lock)
    data = read_cache(cached, verify=False)  # its shards were hashed as they were written
    if data is None:
        raise UserError(f"the data just prepared in {cached} does not read back (see the line above): check the disk")
    return data


def build(folder: Path, specs, sources: list[str], digests: dict, key: str, data_args: DataArguments,
          clean_args: CleanArguments, renderer: ChatRenderer) -> None:
    """Prepares the data in `folder`, resuming what an interrupted preparation there committed."""
    (folder / "shards").mkdir(exist_ok=True)
    checker = RowChecker(clean_args, renderer, data_args.system_prompt, clean_args.clean)
    with dedup_store(folder, checker.minhash) as store:
        progress = store.progress() or {"rows_read": 0, "shards": [], "rejected_bytes": 0, "result": None}
        result = CleanResult.from_state(progress["result"]) if progress["result"] else None
        writer = ShardWriter(folder, sources, progress["shards"], progress["rejected_bytes"])
        cleaner = Cleaner(clean_args, renderer, checker.minhash, store, writer, result)
        done = progress["rows_read"]
        committed = {"shards": len(progress["shards"]), "rows": done}

        def note() -> str:
            return (f"{committed['shards']} shard(s) of the preparation ({committed['rows']:,} rows read) are "
                    f"committed in {folder}; the same command resumes after them")

        def commit() -> None:
            store.commit(writer.progress(cleaner.result))
            committed.update(shards=len(writer.shards), rows=cleaner.result.rows_read)
        if done:
            print(f"resuming the interrupted preparation of {folder.name[1:-8]}: {len(progress['shards'])} shards "
                  f"done, {done:,} rows read; reading on from there")
        if clean_args.datatrove_tasks:
            batches, per_dataset = checked_on_datatrove(folder, data_args, clean_args, renderer)
            batches = skip_rows(batches, done)
        else:
            per_dataset = {}
            rows = iter_datasets(specs, data_args.split_seed, per_dataset, clean_args.max_row_bytes)
            rows = itertools.islice(rows, done, None)  # rows read before are read past (parsed, not checked)
            batches = checked_batches(checker, rows, clean_args.num_proc)
        with interrupt_note(note), closing(batches), tqdm(desc="preparing", unit="rows", initial=done,
                                                          mininterval=1.0) as bar:
            for count, (batch, outcome) in enumerate(batches, start=1):
                cleaner.add_batch(batch, *outcome)
                writer.end_batch()
                bar.update(len(batch))
                if count % SHARD_BATCHES == 0:
                    writer.end_shard()
                    commit()
            writer.end_shard()
            commit()
        writer.close()
    finish(folder, writer.shards, cleaner.result, per_dataset, sources, digests, key, data_args, renderer)


def checked_on_datatrove(folder: Path, data_args: DataArguments, clean_args: CleanArguments,
                         renderer: ChatRenderer) -> tuple:
    """The rows checked by clean_args.datatrove_tasks datatrove tasks (sftlab.data.pipeline, stage 1; tasks that
    completed before are not run again), as batches in order, and the datasets' counts."""
    from sftlab.data import pipeline

    steps = pipeline.check_steps(data_args.data_files, folder, clean_args, renderer.tokenizer.name_or_path,
                                 renderer.max_length, renderer.overflow, data_args.system_prompt, data_args.split_seed)
    pipeline.run_locally(steps, folder, clean_args.datatrove_tasks, clean_args.num_proc)
    return pipeline.checked_batches(folder, clean_args.datatrove_tasks), pipeline.dataset_counts(folder)


def skip_rows(batches, rows: int):
    """The batches after the first `rows` rows (a resumed preparation's shards end on a batch boundary)."""
    for batch, outcome in batches:
        if rows <= 0:
            yield batch, outcome
        rows -= len(batch)


def finish(folder: Path, shards: list[dict], result: CleanResult, per_dataset: dict, sources: list[str],
           digests: dict, key: str, data_args: DataArguments, renderer: ChatRenderer) -> None:
    """The split, the weights, the report, the manifest and prepared.json (last: with it the folder is
    complete), from the shards, read memory-mapped (a byte and an int32 a row come into memory)."""
    remove_store(folder)  # the duplicate state: done with
    for name in ("checked", "datatrove-logs"):
        shutil.rmtree(folder / name, ignore_errors=True)  # datatrove's check results and logs: done with
    table = open_shards(folder, shards)
    n = len(table) if table is not None else 0
    source_of = column_of(table, "source", np.int32)
    train_idx, test_idx = split_indices(n, data_args.test_size, data_args.split_seed)
    weights = {source: info["weight"] for info in per_dataset.values() for source in info["sources"]}
    train_idx = weighted_indices(train_idx, source_of, sources, weights, data_args.split_seed)
    report = build_report(result, sources, renderer.max_length, renderer.tokenizer.name_or_path,
                          renderer.default_system)
    train_rows = np.bincount(source_of[train_idx], minlength=len(sources))
    report["datasets"] = dataset_rows(per_dataset, result, {s: int(train_rows[i]) for i, s in enumerate(sources)})
    np.save(folder / TRAIN_ROWS, train_idx)
    np.save(folder / TEST_ROWS, test_idx)
    examples = examples_by_kind(table, train_idx, column_of(table, "kind", np.int8), renderer)
    write_atomic(folder / MANIFEST, json.dumps({"fingerprint": key, "rows": n, "tokens": sum(
        entry["tokens"] for entry in shards), "shards": shards}, indent=1) + "\n")
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != ".lock"}
    meta = {"report": report, "fingerprint": key, "examples": examples, "sources": digests, FILES: files}
    write_atomic(folder / META, json.dumps(meta, ensure_ascii=False))


def weighted_indices(indices: np.ndarray, source_of: np.ndarray, sources: list[str], weights: dict[str, float],
                     seed: int) -> np.ndarray:
    """Training indices with each dataset's weight applied (sftlab.data.sources.weighted, on index arrays: the
    same rows): weight 2 lists every row twice, 0.5 half of the rows (a seeded sample), 1.5 every row once and a
    seeded half again. `source_of[i]`: row i's file, as an index into `sources`."""
    parts = []
    for source_id in np.unique(source_of[indices]):
        rows = indices[source_of[indices] == source_id]
        source = sources[source_id]
        weight = weights.get(source, 1.0)
        whole, part = int(weight), weight - int(weight)
        parts += [rows] * whole
        extra = round(part * len(rows))
        if extra:  # random.sample picks positions from the population's length alone: the list version's picks
            picked = random.Random(f"{seed}:{source}:weight").sample(range(len(rows)), extra)
            parts.append(rows[np.asarray(picked, dtype=np.int64)])
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def examples_by_kind(table: Dataset | None, train_idx: np.ndarray, kinds: np.ndarray, renderer: ChatRenderer
                     ) -> list[dict]:
    """The first training sample of each kind present (plain, system, multi-turn, tool call), in the order they
    first come: the doctor checks the saved template against each, since a template can render one kind right
    and another wrong."""
    if table is None or not len(train_idx):
        return []
    train_kinds = kinds[train_idx]
    firsts = sorted((int(train_idx[np.argmax(train_kinds == k)]), KINDS[k]) for k in np.unique(train_kinds))
    return [_example(table[row], renderer, kind) for row, kind in firsts]


def _example(row: dict, renderer: ChatRenderer, kind: str) -> dict:
    """One training sample as rendered, with the length settings that shaped it (for `sftlab doctor`)."""
    return {"kind": kind, **json.loads(row["conversation"]), "input_ids": list(row["input_ids"]),
            "labels": list(row["labels"]), "max_length": renderer.max_length, "overflow": renderer.overflow}


def source_digests(sources: list[str]) -> dict[str, str]:
    """{data file: SHA-256 of its bytes} ("hub:" sources are named by their id alone)."""
    digests = {}
    for source in sources:
        digest = hashlib.sha256()
        if not source.startswith("hub:"):
            with open(source, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        digests[source] = digest.hexdigest()
    return digests


def cache_key(digests: dict[str, str], data_args: DataArguments, clean_args: CleanArguments,
              renderer: ChatRenderer) -> str:
    digest = hashlib.sha256()
    for source, content in digests.items():
        digest.update(source.encode() + content.encode())
    tokenizer = renderer.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else str(sorted(tokenizer.get_vocab().items()))).encode())
    settings = dict(template=tokenizer.chat_template, max_length=renderer.max_length, overflow=renderer.overflow,
                    data=asdict(data_args), version=__version__,
                    # how many processes or tasks clean, not what comes out
                    clean={k: v for k, v in asdict(clean_args).items() if k not in ("num_proc", "datatrove_tasks")})
    # a change to the preparing code is a new key too
    for module in (chat_format, clean, cleaner, convert, dedup, lengths, load, near_dedup, shard_files, dataset_sources,
                   sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


META = "prepared.json"  # written last: a folder with it is complete
MANIFEST = "manifest.json"  # the shards: file, rows, tokens, SHA-256
TRAIN_ROWS, TEST_ROWS = "train_rows.npy", "test_rows.npy"  # the split and weights, as indices into the shards
FILES = "files"  # in META: each file's size as written, checked at every read (a cut-short file is rebuilt)


def read_cache(folder: Path, verify: bool = True) -> PreparedData | None:
    """The prepared data, memory-mapped; None, after removing the folder with a line, when it is damaged (a file
    cut short or missing, or Arrow that does not read): the caller prepares it again."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        sizes = {name: (size, size_on_disk(folder / name)) for name, size in meta.pop(FILES).items()}
        damaged = next((f"{name}: {'no file' if now is None else f'{now} bytes'}, {size} bytes were written"
                        for name, (size, now) in sizes.items() if now != size), None)
        if damaged is None:
            shards = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["shards"]
            damaged = next((f"{entry['file']}: its bytes do not match the hash in {MANIFEST}" for entry in shards
                            if verify and not shard_intact(folder, entry)), None)
        if damaged is None:
            table = open_shards(folder, shards)
            train, test = (rows_at(table, np.load(folder / name)) for name in (TRAIN_ROWS, TEST_ROWS))
            return PreparedData(train=train.select_columns(list(COLUMNS)), test=test.select_columns(list(COLUMNS)),
                                heldout=Conversations(test), rejected=folder / "rejected.jsonl", folder=folder,
                                **meta)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        damaged = f"it does not read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"prepared-data cache {folder} is damaged ({damaged}): removing it and preparing the data again")
    shutil.rmtree(folder, ignore_errors=True)
    return None


