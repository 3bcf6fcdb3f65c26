"""Datasets as a config names them, with the per-dataset options users of LLaMA-Factory (dataset_info.json)
and Axolotl (`datasets:`) expect. An entry of `data_files` is a file, glob, Hub id or `sftlab:demo`, or a
mapping:

    data_files:
      - sftlab:demo
      - path: data/qa.jsonl
        columns: {instruction: question, output: answer}   # sftlab's field name: this file's field name
        max_samples: 500   # a seeded sample of 500 rows; the others are counted as not_sampled
        weight: 2.0        # each kept training row of this dataset counts twice (0.5: half of them, sampled)
      - path: hub:org/name:subset:split
        columns: {messages: dialog}

On the command line a mapping is given as JSON: --data_files '{"path": "a.jsonl", "weight": 2}'. Weights apply
to the training split only, after cleaning (the held-out split is never repeated); the data report lists every
dataset with its rows read, sampled, kept, rejected and training rows after weighting.
"""

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

from sftlab.config import MAX_ROW_BYTES
from sftlab.data.convert import FIELDS  # what `columns` may map a file's own names onto
from sftlab.data.load import SourceRow, expand_inputs, iter_source
from sftlab.errors import UserError

OPTIONS = ("path", "columns", "max_samples", "weight")


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    columns: tuple[tuple[str, str], ...] = ()  # (sftlab's field, the file's field)
    max_samples: int | None = None
    weight: float = 1.0


def dataset_specs(entries: list, fields: tuple[str, ...] = FIELDS) -> list[DatasetSpec]:
    """`data_files` entries -> specs; a bad option is one line naming the entry and the option. `fields`: the
    names `columns` may map onto (preference data reads others)."""
    return [_spec(entry, n, fields) for n, entry in enumerate(entries)]


def _spec(entry, n: int, fields: tuple[str, ...]) -> DatasetSpec:
    where = f"data_files[{n}]"
    if isinstance(entry, str) and entry.lstrip().startswith("{"):
        try:
            entry = json.loads(entry)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg}): {entry}") from exc
    if isinstance(entry, str):
        return DatasetSpec(entry)
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise UserError(f"{where}: expected a file name or a mapping with a path, got {entry!r}")
    unknown = sorted(set(entry) - set(OPTIONS))
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    columns = entry.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise UserError(f"{where}.columns: expected a mapping of sftlab field: your field, got {columns!r}")
    bad = sorted(set(columns) - set(fields))
    if bad:
        raise UserError(f"{where}.columns: {', '.join(bad)} is not a field sftlab reads ({', '.join(fields)})")
    max_samples = entry.get("max_samples")
    if max_samples is not None and (not isinstance(max_samples, int) or isinstance(max_samples, bool)
                                    or max_samples < 1):
        raise UserError(f"{where}.max_samples: must be a positive integer, got {max_samples!r}")
    weight = entry.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight <= 100:
        raise UserError(f"{where}.weight: must be a number in (0, 100], got {weight!r}")
    return DatasetSpec(entry["path"], tuple(sorted(columns.items())), max_samples, float(weight))


def renamed(row, columns: tuple[tuple[str, str], ...]):
    """The row with the file's field names replaced by sftlab's (a row without the field is left as it is,
    and is then rejected as malformed_record by the field it lacks)."""
    if not columns or not isinstance(row, dict):
        return row
    row = dict(row)
    for ours, theirs in columns:
        if theirs in row:
            row[ours] = row.pop(theirs)
    return row


def read_datasets(specs: list[DatasetSpec], seed: int, max_row_bytes: int = MAX_ROW_BYTES
                  ) -> tuple[list[SourceRow], dict[str, dict]]:
    """Every row of every dataset, as a list (iter_datasets streams them), and the per-dataset counts."""
    stats = {}
    rows = list(iter_datasets(specs, seed, stats, max_row_bytes))
    return rows, stats


def iter_datasets(specs: list[DatasetSpec], seed: int, stats: dict, max_row_bytes: int = MAX_ROW_BYTES
                  ) -> Iterator[SourceRow]:
    """Every row of every dataset, read as it is used, columns mapped and max_samples applied (a sample drawn
    under `seed`, in file order). `stats` receives per dataset {"sources", "read", "not_sampled", "weight"},
    complete once the rows are all read. A dataset with max_samples is read twice: once to count its rows (the
    sample depends on the count), once to yield the chosen ones, so that neither pass holds the rows."""
    for spec in specs:
        sources = expand_inputs([spec.path])
        entry = stats.setdefault(spec.path, {"sources": [], "read": 0, "not_sampled": 0, "weight": spec.weight})
        entry["sources"] += sources
        chosen = None
        if spec.max_samples is not None:
            total = sum(1 for source in sources for _ in iter_source(source, max_row_bytes))
            if total > spec.max_samples:
                chosen = set(random.Random(f"{seed}:{spec.path}").sample(range(total), spec.max_samples))
        index = 0
        for source in sources:
            for source_row in iter_source(source, max_row_bytes):
                entry["read"] += 1
                index += 1
                if chosen is not None and index - 1 not in chosen:
                    entry["not_sampled"] += 1
                    continue
                source_row.row = renamed(source_row.row, spec.columns)
                yield source_row


def weighted(indices: list[int], sources: list[str], weights: dict[str, float], seed: int) -> list[int]:
    """Training indices with each dataset's weight applied: weight 2 lists every row twice, 0.5 half of the
    rows (a seeded sample), 1.5 every row once and a seeded half again. `sources[i]` is row i's file."""
    by_source: dict[str, list[int]] = {}
    for i in indices:
        by_source.setdefault(sources[i], []).append(i)
    out = []
    for source, rows in by_source.items():
        weight = weights.get(source, 1.0)
        whole, part = int(weight), weight - int(weight)
        out += rows * whole
        extra = round(part * len(rows))
        if extra:
            out += sorted(random.Random(f"{seed}:{source}:weight").sample(rows, extra))
    return sorted(out)
