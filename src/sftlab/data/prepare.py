"""Data files -> cleaned, rendered train and held-out samples, cached under a content hash.

The cache key covers the data files' bytes, the tokenizer and its chat template, max_length, the cleaning
config and the split, so a second run (and every process of a multi-process run) reuses the result, and any
change to one of them prepares the data again."""

import hashlib
import json
import os
import random
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sftlab import __version__, chat_format
from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments, DataArguments
from sftlab.data import clean, convert, load, near_dedup
from sftlab.data.clean import clean_rows
from sftlab.data.load import expand_inputs, read_source
from sftlab.data.report import build_report, summary_line
from sftlab.environment import cache_root


@dataclass
class PreparedData:
    train: list[dict]  # {"input_ids": [...], "labels": [...]}
    test: list[dict]
    test_messages: list[list[dict]]  # the held-out conversations, for evaluation
    rejected: list[dict]  # {"reason", "source", "line", "detail"}
    report: dict
    fingerprint: str  # the content hash the prepared data is cached under
    example: dict | None  # the first training conversation with its ids and labels, for `sftlab doctor`

    def summary(self) -> str:
        return summary_line(self.report) + f"; {len(self.train)} train, {len(self.test)} held out"


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
                 use_cache: bool = True) -> PreparedData:
    sources = expand_inputs(data_args.data_files)
    key = cache_key(sources, data_args, clean_args, renderer)
    cached = cache_root() / "datasets" / f"{key}.json"
    if use_cache and cached.exists():
        return PreparedData(**json.loads(cached.read_text(encoding="utf-8")))
    result = clean_rows(read_all(sources), clean_args, renderer, data_args.system_prompt, enabled=clean_args.clean,
                        progress=True)
    report = build_report(result, sources, renderer.max_length, renderer.tokenizer.name_or_path)
    train_idx, test_idx = split_indices(len(result.kept), data_args.test_size, data_args.split_seed)

    def samples(indices):
        return [{"input_ids": result.kept[i].sample.input_ids, "labels": result.kept[i].sample.labels}
                for i in indices]

    data = PreparedData(
        train=samples(train_idx), test=samples(test_idx),
        test_messages=[result.kept[i].messages for i in test_idx],
        rejected=[{"reason": r.reason, "source": r.source, "line": r.line, "detail": r.detail}
                  for r in result.rejected],
        report=report, fingerprint=key,
        example=_example(result.kept[train_idx[0]], renderer) if train_idx else None,
    )
    if use_cache:
        write_cache(cached, data)
    return data


def _example(kept, renderer: ChatRenderer) -> dict:
    """One training sample as rendered, with the length settings that shaped it (for `sftlab doctor`)."""
    return {"messages": kept.messages, "input_ids": kept.sample.input_ids, "labels": kept.sample.labels,
            "max_length": renderer.max_length, "overflow": renderer.overflow}


def cache_key(sources: list[str], data_args: DataArguments, clean_args: CleanArguments,
              renderer: ChatRenderer) -> str:
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.encode())
        if not source.startswith("hub:"):
            with open(source, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    tokenizer = renderer.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else str(sorted(tokenizer.get_vocab().items()))).encode())
    settings = dict(template=tokenizer.chat_template, max_length=renderer.max_length, overflow=renderer.overflow,
                    data=asdict(data_args), clean=asdict(clean_args), version=__version__)
    # a change to the preparing code is a new key too
    for module in (chat_format, clean, convert, load, near_dedup, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def write_cache(path: Path, data: PreparedData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".prepared-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(asdict(data), f, ensure_ascii=False)
    os.replace(tmp, path)  # atomic: another process never reads a half-written cache
