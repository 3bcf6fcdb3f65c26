"""The cleaning stage's stream: rows go through a batch at a time, the per-row checks (clean.RowChecker) in worker
processes (pool.py) or datatrove tasks (pipeline.py), the cross-row decisions (Cleaner) in one process, in file
order, with the duplicate state on disk (dedup.py) and the kept and rejected rows handed to a sink as they are
decided, so memory does not grow with the row count and the result is the same with any number of workers."""

import hashlib
import itertools
import multiprocessing as mp
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from sftlab.chat_format import ChatRenderer, SampleTooLong
from sftlab.chat_tools import message_text
from sftlab.config import CleanArguments
from sftlab.data import dedup
from sftlab.data.clean import MALFORMED, Checked, CleanResult, Kept, Reject, Rejected, Rejection, RowChecker
from sftlab.data.dedup import DedupStore
from sftlab.data.load import SourceRow
from sftlab.data.near_dedup import MinHash
from sftlab.data.pool import checked_in_pool
from sftlab.errors import UserError


class Cleaner:
    """The cross-row decisions, in file order, so the first occurrence of a duplicate wins. Duplicate state lives
    in a DedupStore on disk; the kept and rejected rows go to `sink` (kept(Kept), rejected(Rejected)) as they are
    decided, or are collected in the result when there is none."""

    def __init__(self, config: CleanArguments, renderer: ChatRenderer, minhash: MinHash | None, store: DedupStore,
                 sink=None, result: CleanResult | None = None):
        self.config, self.renderer, self.minhash, self.store = config, renderer, minhash, store
        self.result = result or CleanResult(unit="tokens" if renderer is not None else "characters")
        self.sink = sink or Collect(self.result)

    def add_batch(self, rows: list[SourceRow], results: list, repairs: Counter, signatures, formats: list) -> None:
        self.result.repairs.update(repairs)
        checked = [outcome for outcome in results if not isinstance(outcome, Rejection)]
        buckets = {id(c): self._buckets(c, signatures[c.signature_row]) for c in checked
                   if c.signature_row is not None and self.minhash is not None}
        self.store.start_batch([c.digest for c in checked if c.digest is not None],
                               [bucket for keys in buckets.values() for bucket in keys])
        for source_row, outcome, row_format in zip(rows, results, formats):
            self.result.rows_read += 1
            if row_format is not None:
                self.result.formats.setdefault(source_row.source, Counter())[row_format] += 1
            if isinstance(outcome, Rejection):
                self._reject(source_row, outcome)
                continue
            try:
                self._keep(self._decide(source_row, outcome, buckets.get(id(outcome))))
            except Reject as reject:
                self._reject(source_row, Rejection(reject.reason, reject.detail))
        self.store.end_batch()

    def _buckets(self, checked: Checked, signature) -> list[int]:
        """The row's LSH buckets: its signature's bands, within the rows of the same tools and calls (rows are near
        duplicates only when those are the same), as 64-bit keys."""
        return [int.from_bytes(hashlib.blake2b(checked.tool_key + bytes([band]) + key, digest_size=8).digest(),
                               "little", signed=True)
                for band, key in enumerate(self.minhash.band_keys(signature))]

    def _keep(self, kept: Kept) -> None:
        self.result.kept_from[kept.source] += 1
        self.result.without_system += kept.messages[0]["role"] != "system"
        self.sink.kept(kept)

    def _reject(self, source_row: SourceRow, rejection: Rejection) -> None:
        if self.config.strict and rejection.reason in MALFORMED:
            raise UserError(f"{source_row.source}:{source_row.line}: {rejection.reason}: {rejection.detail} "
                            "(--strict)")
        self.result.rejected_for[rejection.reason] += 1
        self.result.rejected_from[source_row.source] += 1
        self.sink.rejected(Rejected(source_row.source, source_row.line, rejection.reason, rejection.detail,
                                    source_row.row))

    def _decide(self, source_row: SourceRow, checked: Checked, buckets: list[int] | None) -> Kept:
        key = f"{source_row.source}:{source_row.line}"
        if checked.digest is not None:
            first = self.store.first_copy(checked.digest, key)
            if first is not None:
                raise Reject("duplicate", f"same as {first}")
        if buckets is not None:
            twin = self.store.near_twin(key, checked.text, buckets)
            if twin is not None:
                raise Reject("near_duplicate", f"near {twin}")
        sample = checked.sample
        if isinstance(sample, Rejection):
            raise Reject(sample.reason, sample.detail)
        if sample is None:  # no model: lengths in characters, no token limit
            response = sum(len(message_text(m)) for m in checked.messages if m["role"] == "assistant")
            self.result.lengths.add(sum(len(message_text(m)) for m in checked.messages) - response, response)
            return Kept(source_row.source, source_row.line, checked.messages, None, checked.tools,
                        checked.record_json)
        supervised = sample.num_supervised
        self.result.lengths.add(len(sample.input_ids) - supervised, supervised)
        try:
            fitted = self.renderer.fit(sample)
            return Kept(source_row.source, source_row.line, checked.messages, fitted, checked.tools,
                        checked.record_json)
        except SampleTooLong as exc:
            raise Reject("too_long", str(exc)) from exc


class Collect:
    """The sink that keeps every row in the result (for inputs that fit in memory: evaluation, tests)."""

    def __init__(self, result: CleanResult):
        self.result = result

    def kept(self, kept: Kept) -> None:
        self.result.kept.append(kept)

    def rejected(self, rejected: Rejected) -> None:
        self.result.rejected.append(rejected)


BATCH_ROWS = 512


PARALLEL_MIN_ROWS = 4096  # below this, starting worker processes costs more than it saves


def worker_count(num_proc: int | None, rows: int) -> int:
    """How many worker processes check the rows: num_proc when given (1: none, all in this process); by default
    one per core for inputs of PARALLEL_MIN_ROWS rows or more (`rows`: how many there are, up to that). Never more
    than there are batches, and none where processes cannot be forked (they inherit the tokenizer instead of
    receiving it pickled)."""
    if "fork" not in mp.get_all_start_methods():
        return 1
    if num_proc is None:
        num_proc = (os.cpu_count() or 1) if rows >= PARALLEL_MIN_ROWS else 1
    return max(1, min(num_proc, -(-rows // BATCH_ROWS)))


def batches_of(rows: Iterator[SourceRow], size: int | None = None) -> Iterator[list[SourceRow]]:
    rows, size = iter(rows), size or BATCH_ROWS
    while batch := list(itertools.islice(rows, size)):
        yield batch


def checked_batches(checker: "RowChecker", rows, num_proc: int | None) -> Iterator[tuple[list, tuple]]:
    """(batch, its check results) for consecutive batches of `rows`, read as they are needed: in worker processes
    for large inputs (forked, so they share the tokenizer), in order either way. Whether the input is large is
    found by reading up to PARALLEL_MIN_ROWS rows ahead."""
    rows = iter(rows)
    ahead = list(itertools.islice(rows, PARALLEL_MIN_ROWS))
    workers = worker_count(num_proc, len(ahead))
    batches = batches_of(itertools.chain(ahead, rows))
    if workers > 1:
        yield from checked_in_pool(checker, batches, workers)
    else:
        for batch in batches:
            yield batch, checker.check_batch(batch)


def clean_rows(rows, config: CleanArguments, renderer: ChatRenderer | None, system_prompt: str | None = None,
               enabled: bool = True, progress: bool = False, sink=None, work_dir: Path | None = None,
               checked: Iterator[tuple[list, tuple]] | None = None) -> CleanResult:
    """Cleans `rows` (SourceRows in file order, read as they are needed). Large inputs are checked in worker
    processes while the duplicate decisions stay in order here: the result is the same with any number of
    workers. `sink`: where kept and rejected rows go as they are decided (by default, into the result);
    `work_dir`: where the duplicate state's SQLite file is kept while cleaning (by default, a temporary
    folder); `checked`: the batches with their check results, when they were checked elsewhere (datatrove tasks:
    sftlab.data.pipeline), in place of `rows`."""
    if not enabled:
        config = CleanArguments(**{**config.__dict__, "near_dedup": False})
    checker = RowChecker(config, renderer, system_prompt, enabled)
    with dedup_store(work_dir, checker.minhash) as store:
        cleaner = Cleaner(config, renderer, checker.minhash, store, sink)
        outcomes = checked if checked is not None else checked_batches(checker, rows, config.num_proc)
        # closing(): a --strict stop here shuts the pool down now, not whenever the generator is collected
        with closing(outcomes), tqdm(desc="cleaning", unit="rows", mininterval=1.0, disable=not progress) as bar:
            for batch, outcome in outcomes:
                cleaner.add_batch(batch, *outcome)
                bar.update(len(batch))
    return cleaner.result


@contextmanager
def dedup_store(work_dir: Path | None, minhash: MinHash | None, name: str = dedup.FILE):
    """A DedupStore in `work_dir` (kept: the caller owns it) or in a temporary folder removed after."""
    if work_dir is not None:
        store = DedupStore(Path(work_dir) / name, minhash)
        try:
            yield store
        finally:
            store.close()
        return
    with tempfile.TemporaryDirectory(prefix="sftlab-dedup-") as folder:
        store = DedupStore(Path(folder) / name, minhash)
        try:
            yield store
        finally:
            store.close()
