"""Data files -> cleaned, rendered train and held-out samples, cached under a content hash.

The cache key covers the data files' bytes, the tokenizer and its chat template, max_length, the cleaning
config and the split, so a second run (and every process of a multi-process run) reuses the result, and any
change to one of them prepares the data again.

The samples are `datasets` Arrow datasets, saved with save_to_disk and read back memory-mapped, so neither a
cached run nor the trainer holds a second copy of the token ids in Python objects; the rest (report, rejected
rows, held-out conversations) is one small JSON file beside them."""

import hashlib
import itertools
import json
import random
import shutil
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, load_from_disk
from datasets import utils as datasets_progress

from sftlab import __version__, chat_format
from sftlab.chat_format import IGNORE_INDEX, ChatRenderer
from sftlab.chat_tools import has_tool_parts
from sftlab.config import CleanArguments, DataArguments
from sftlab.data import clean, convert, load, near_dedup
from sftlab.data import sources as dataset_sources
from sftlab.data.clean import clean_rows
from sftlab.data.load import expand_inputs, read_source
from sftlab.data.report import build_report, dataset_rows, summary_line
from sftlab.data.sources import dataset_specs, read_datasets, weighted
from sftlab.environment import cache_root
from sftlab.errors import UserError
from sftlab.files import remove_stale_staging, staged_folder


@dataclass
class PreparedData:
    train: "Dataset"  # columns input_ids, labels, length (tokens), num_supervised
    test: "Dataset"
    heldout: list[dict]  # the held-out conversations, {"messages", "tools"} (tools where there are any)
    rejected: list[dict]  # {"reason", "source", "line", "detail"}
    report: dict
    fingerprint: str  # the content hash the prepared data is cached under
    examples: list[dict]  # the first training sample of each kind present, as rendered, for `sftlab doctor`
    sources: dict[str, str]  # each data file's SHA-256 (a resume names the file that changed)

    def summary(self) -> str:
        datasets = self.report.get("datasets", {})
        mix = "".join(f"\n  {name}: {d['kept']} kept, weight {d['weight']:g}, {d['train_rows']} training rows"
                      for name, d in datasets.items()) if len(datasets) > 1 else ""
        return summary_line(self.report) + f"; {len(self.train)} train, {len(self.test)} held out" + mix


def split_indices(n: int, test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split, identical in every process (the tutorial's was unseeded, so test rows leaked)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = 0 if test_size == 0 or n < 2 else max(1, round(n * test_size))
    return sorted(order[n_test:]), sorted(order[:n_test])


def read_all(sources: list[str]):
    for source in sources:
        yield from read_source(source)


def prepare_data(data_args: DataArguments, clean_args: CleanArguments, renderer: ChatRenderer,
                 use_cache: bool = True, cached_only: bool = False) -> PreparedData:
    """The prepared data, from the cache when it is there. `cached_only`: for the processes of a multi-process
    run that wait for the main one to prepare it; when it is not there, the main one failed, and preparing it
    again here would only repeat that (for hours, on a large dataset)."""
    specs = dataset_specs(data_args.data_files)
    sources = [source for spec in specs for source in expand_inputs([spec.path])]
    digests = source_digests(sources)
    key = cache_key(digests, data_args, clean_args, renderer)
    cached = cache_root() / "datasets" / key
    if use_cache and (cached / META).exists():
        data = read_cache(cached)
        if data is not None:
            return data
    if cached_only:
        raise UserError(f"the main process did not prepare the data (no {cached}): it stopped, and its error says "
                        "why")
    rows, per_dataset = read_datasets(specs, data_args.split_seed, clean_args.max_row_bytes)
    result = clean_rows(rows, clean_args, renderer, data_args.system_prompt, enabled=clean_args.clean,
                        progress=True, compact=True)
    report = build_report(result, sources, renderer.max_length, renderer.tokenizer.name_or_path,
                          renderer.default_system)
    train_idx, test_idx = split_indices(len(result.kept), data_args.test_size, data_args.split_seed)
    weights = {source: info["weight"] for info in per_dataset.values() for source in info["sources"]}
    kept_sources = [kept.source for kept in result.kept]
    train_idx = weighted(train_idx, kept_sources, weights, data_args.split_seed)
    report["datasets"] = dataset_rows(per_dataset, result, Counter(kept_sources[i] for i in train_idx))

    def samples(indices):
        return samples_dataset([result.kept[i].sample for i in indices])

    data = PreparedData(
        train=samples(train_idx), test=samples(test_idx),
        heldout=[conversation_record(result.kept[i]) for i in test_idx],
        rejected=[{"reason": r.reason, "source": r.source, "line": r.line, "detail": r.detail}
                  for r in result.rejected],
        report=report, fingerprint=key,
        examples=examples_by_kind([result.kept[i] for i in train_idx], renderer), sources=digests,
    )
    if use_cache:
        write_cache(cached, data)
        return read_cache(cached) or data  # memory-mapped: the in-memory copy above is freed
    return data


def samples_dataset(samples: list) -> Dataset:
    """The samples as an Arrow dataset, built from flat int32 buffers: never from per-token Python lists,
    which take about ten times the memory of the ids themselves."""
    supervised = [len(s.labels) - s.labels.count(IGNORE_INDEX) for s in samples]
    table = pa.table({"input_ids": int32_lists([s.input_ids for s in samples]),
                      "labels": int32_lists([s.labels for s in samples]),
                      "length": pa.array([len(s.input_ids) for s in samples], type=pa.int32()),
                      "num_supervised": pa.array(supervised, type=pa.int32())})
    return Dataset(table)


def int32_lists(rows: list) -> pa.ListArray:
    """A list<int32> Arrow column from sequences of ints (lists, or the compact array('i') of clean_rows)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def conversation_record(kept) -> dict:
    """A conversation as heldout.jsonl, clean.jsonl and render_check.json keep it: OpenAI's row form."""
    return {"messages": kept.messages, **({"tools": kept.tools} if kept.tools else {})}


def sample_kind(messages: list[dict], tools: list | None = None) -> str:
    if has_tool_parts(messages, tools):
        return "tool call"
    if sum(m["role"] == "assistant" for m in messages) > 1:
        return "multi-turn"
    return "system" if messages[0]["role"] == "system" else "plain"


def examples_by_kind(kept: list, renderer: ChatRenderer) -> list[dict]:
    """The first training sample of each kind present (plain, system, multi-turn, tool call): the doctor checks
    the saved template against each, since a template can render one kind right and another wrong."""
    firsts = {}
    for row in kept:
        firsts.setdefault(sample_kind(row.messages, row.tools), row)
        if len(firsts) == 4:  # every kind found: no need to look at the rest of a large dataset
            break
    return [_example(row, renderer, kind) for kind, row in firsts.items()]


def _example(kept, renderer: ChatRenderer, kind: str) -> dict:
    """One training sample as rendered, with the length settings that shaped it (for `sftlab doctor`)."""
    return {"kind": kind, **conversation_record(kept), "input_ids": list(kept.sample.input_ids),
            "labels": list(kept.sample.labels),
            "max_length": renderer.max_length, "overflow": renderer.overflow}


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
                    # num_proc: how many processes clean, not what comes out
                    clean={k: v for k, v in asdict(clean_args).items() if k != "num_proc"})
    # a change to the preparing code is a new key too
    for module in (chat_format, clean, convert, load, near_dedup, dataset_sources, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


META = "prepared.json"
FILES = "files"  # in META: each file's size as written, checked at every read (a cut-short file is rebuilt)
SPLITS = ("train", "test")


def write_cache(folder: Path, data: PreparedData) -> None:
    """Arrow datasets and a JSON file, written into a temporary folder that is renamed into place: another
    process never reads a half-written cache (the JSON file, written last, marks it complete)."""
    remove_stale_staging(folder.parent)  # what a killed preparation left behind, of any key
    try:
        with staged_folder(folder) as staging:
            for split in SPLITS:
                if len(getattr(data, split)):  # datasets cannot load an empty saved dataset; read_cache makes one
                    with quiet_datasets():
                        getattr(data, split).save_to_disk(str(staging / split))
            meta = {f.name: getattr(data, f.name) for f in fields(data) if f.name not in SPLITS}
            files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
            (staging / META).write_text(json.dumps({**meta, FILES: files}, ensure_ascii=False), encoding="utf-8")
    except OSError:
        if not (folder / META).exists():  # not a lost race with another process writing the same data
            raise


@contextmanager
def quiet_datasets():
    """No progress bar from `datasets` for a cache save that takes a moment (the cleaning bar said it all)."""
    was_enabled = datasets_progress.is_progress_bar_enabled()
    datasets_progress.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets_progress.enable_progress_bars()


def read_cache(folder: Path) -> PreparedData | None:
    """The cached data; None, after removing the entry with a line, when it is damaged (a file cut short or
    missing, or Arrow that does not read): the caller prepares it again."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        sizes = {name: (size, size_on_disk(folder / name)) for name, size in meta.pop(FILES).items()}
        damaged = next((f"{name}: {'no file' if now is None else f'{now} bytes'}, {size} bytes were written"
                        for name, (size, now) in sizes.items() if now != size), None)
        if damaged is None:
            splits = {split: load_from_disk(str(folder / split)) if (folder / split).exists() else samples_dataset([])
                      for split in SPLITS}
            return PreparedData(**splits, **meta)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        damaged = f"it does not read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"prepared-data cache {folder} is damaged ({damaged}): removing it and preparing the data again")
    shutil.rmtree(folder, ignore_errors=True)
    return None


def size_on_disk(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None
