"""The prepared data on disk: Arrow shards of rendered samples (ids, labels, lengths, each row's source, kind and
conversation), written a batch at a time by the preparation's sink, each committed with its hashes, and read back
memory-mapped and concatenated without a copy. prepare.py decides what goes in; this module is how it is held."""

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, concatenate_datasets

from sftlab.chat_format import IGNORE_INDEX
from sftlab.chat_tools import has_tool_parts
from sftlab.data.clean import CleanResult, record_of
from sftlab.files import file_digest, file_digests

COLUMNS = ("input_ids", "labels", "length", "num_supervised")  # what training reads


KINDS = ("plain", "system", "multi-turn", "tool call")


SHARD_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                          ("length", pa.int32()), ("num_supervised", pa.int32()),
                          ("source", pa.int32()),  # index into the prepared data's sources
                          ("kind", pa.int8()),  # index into KINDS
                          ("conversation", pa.string())])  # {"messages", "tools"?} as JSON, for the held-out rows


class ShardWriter:
    """The preparation's sink: kept samples go to the current shard (an Arrow stream file, a record batch per
    batch of rows), rejected rows to rejected.jsonl. A shard is named in the progress record only once it is
    complete; what an interrupted run wrote past its last record is removed here."""

    def __init__(self, folder: Path, sources: list[str], shards: list[dict], rejected_bytes: int):
        self.folder, self.shards, self.pending = folder, list(shards), []
        self.stream = self.sink = self.path = None  # the shard being written
        self.rows = self.tokens = 0
        self.source_ids = {source: i for i, source in enumerate(sources)}
        changed = next((entry["file"] for entry in self.shards if not shard_intact(folder, entry)), None)
        if changed is not None:  # a committed shard that changed since: the rows it held cannot be trusted
            raise DamagedShard(f"{folder / changed} does not match the hash it was committed with")
        named = {entry["file"] for entry in self.shards}
        for path in (folder / "shards").iterdir():
            if f"shards/{path.name}" not in named:
                path.unlink()  # written after the last commit: its rows are read again
        self.rejects = open(folder / "rejected.jsonl", "ab")
        self.rejects.truncate(rejected_bytes)
        self.rejects.seek(rejected_bytes)

    def kept(self, kept) -> None:
        self.pending.append(kept)

    def rejected(self, r) -> None:
        self.rejects.write(json.dumps({"reason": r.reason, "source": r.source, "line": r.line, "detail": r.detail},
                                      ensure_ascii=False).encode() + b"\n")

    def end_batch(self) -> None:
        """The batch's kept samples, appended to the current shard as one record batch."""
        if not self.pending:
            return
        if self.stream is None:
            self.path = self.folder / "shards" / f"{len(self.shards):05d}.arrow"
            self.sink = pa.OSFile(str(self.path) + ".tmp", "wb")
            self.stream, self.rows, self.tokens = pa.ipc.new_stream(self.sink, SHARD_SCHEMA), 0, 0
        samples = [kept.sample for kept in self.pending]
        columns = samples_columns(samples)
        columns["source"] = pa.array([self.source_ids[kept.source] for kept in self.pending], type=pa.int32())
        columns["kind"] = pa.array([KINDS.index(sample_kind(k.messages, k.tools)) for k in self.pending],
                                   type=pa.int8())
        columns["conversation"] = pa.array([k.record_json or json.dumps(conversation_record(k), ensure_ascii=False)
                                            for k in self.pending], type=pa.string())
        self.stream.write_batch(pa.record_batch(columns, schema=SHARD_SCHEMA))
        self.rows += len(samples)
        self.tokens += int(columns["length"].to_numpy().sum())
        self.pending = []

    def end_shard(self) -> None:
        """Closes the current shard (synced, then renamed to its name: a shard under its name is complete)."""
        if self.stream is None:
            return
        self.stream.close()
        self.sink.close()
        tmp = Path(str(self.path) + ".tmp")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digests = file_digests(tmp, "sha256", "xxh3_128")
        os.replace(tmp, self.path)
        self.shards.append({"file": f"shards/{self.path.name}", "rows": self.rows, "tokens": self.tokens, **digests})
        self.stream = None

    def progress(self, result: CleanResult) -> dict:
        """The record committed with the duplicate state: what the rows read so far produced."""
        self.rejects.flush()
        os.fsync(self.rejects.fileno())
        return {"rows_read": result.rows_read, "shards": self.shards, "rejected_bytes": self.rejects.tell(),
                "result": result.to_state()}

    def close(self) -> None:
        self.rejects.close()


class DamagedShard(Exception):
    """A committed shard of an interrupted preparation whose bytes changed: the preparation starts over."""


def shard_intact(folder: Path, entry: dict) -> bool:
    """A shard's bytes match the hash committed with it (XXH3-128: about 10x faster to check than SHA-256, which
    older manifests hold alone and which is then checked instead). A same-size bit flip passes a size check."""
    algorithm = "xxh3_128" if "xxh3_128" in entry else "sha256"
    path = folder / entry["file"]
    return path.is_file() and file_digest(path, algorithm) == entry[algorithm]


def open_shards(folder: Path, shards: list[dict]) -> Dataset | None:
    """The shards as one Dataset, memory-mapped and concatenated without a copy; None when there are none."""
    if not shards:
        return None
    return concatenate_datasets([Dataset.from_file(str(folder / entry["file"])) for entry in shards])


def column_of(table: Dataset | None, name: str, dtype) -> np.ndarray:
    """One column of the concatenated shards as a numpy array."""
    if table is None:
        return np.zeros(0, dtype=dtype)
    return table.data.column(name).to_numpy().astype(dtype, copy=False)


def samples_columns(samples: list) -> dict:
    """input_ids, labels, length and num_supervised as Arrow columns, built from flat int32 buffers: never from
    per-token Python lists, which take about ten times the memory of the ids themselves."""
    supervised = [len(s.labels) - list(s.labels).count(IGNORE_INDEX) for s in samples]
    return {"input_ids": int32_lists([s.input_ids for s in samples]),
            "labels": int32_lists([s.labels for s in samples]),
            "length": pa.array([len(s.input_ids) for s in samples], type=pa.int32()),
            "num_supervised": pa.array(supervised, type=pa.int32())}


def samples_dataset(samples: list) -> Dataset:
    return Dataset(pa.table(samples_columns(samples)))


def int32_lists(rows: list) -> pa.ListArray:
    """A list<int32> Arrow column from sequences of ints (lists, or the compact array('i') of clean_rows)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def conversation_record(kept) -> dict:
    """A conversation as heldout.jsonl, clean.jsonl and render_check.json keep it: OpenAI's row form."""
    return record_of(kept.messages, kept.tools)


def sample_kind(messages: list[dict], tools: list | None = None) -> str:
    if has_tool_parts(messages, tools):
        return "tool call"
    if sum(m["role"] == "assistant" for m in messages) > 1:
        return "multi-turn"
    return "system" if messages[0]["role"] == "system" else "plain"


def rows_at(table: Dataset | None, indices: np.ndarray) -> Dataset:
    """The rows at `indices` (repeats allowed), through an index mapping kept in memory (8 bytes a row): the
    shards are not copied."""
    if table is None:
        return Dataset(pa.table({**samples_columns([]), "source": pa.array([], pa.int32()),
                                 "kind": pa.array([], pa.int8()), "conversation": pa.array([], pa.string())}))
    return table.select(indices, keep_in_memory=True)


def size_on_disk(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None
