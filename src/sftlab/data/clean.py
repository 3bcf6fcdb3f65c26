"""The cleaning stage: named filters, each with a reason code. Every row is either kept or rejected with one
reason, so kept + rejected = rows read; nothing is dropped silently.

Reason codes, in the order they are checked:
  bad_json, invalid_utf8   the line could not be read
  mixed_format             the row's fields are of another format than the file's
  malformed_record         a field is missing or of the wrong type
  empty_instruction        a user message is empty
  empty_response           an assistant message is empty
  role_order               the roles are not user -> assistant [-> observation -> assistant ...]
  boilerplate              a reply contains a configured phrase ("As an AI language model", ...)
  short_response           the last reply is shorter than min_response_chars
  duplicate                the same conversation as an earlier row, after normalization
  near_duplicate           MinHash/LSH: estimated 5-gram Jaccard >= the threshold with an earlier row
  too_long                 over max_length tokens, measured with the model's tokenizer and chat template

Text repairs (counted, never a rejection): CRLF and CR to LF, control characters removed, zero-width spaces
and NBSP fixed, surrounding whitespace stripped. Chinese text and full-width punctuation are never altered.
"""

import hashlib
import multiprocessing as mp
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from sftlab.chat_format import ChatRenderer, MessageError, RenderedSample, SampleTooLong, validate_messages
from sftlab.config import CleanArguments
from sftlab.data.convert import FieldError, detect_format, to_messages
from sftlab.data.load import SourceRow
from sftlab.errors import UserError

MALFORMED = ("bad_json", "invalid_utf8", "mixed_format", "malformed_record", "role_order")
REASONS = MALFORMED[:4] + ("empty_instruction", "empty_response", "role_order", "boilerplate", "short_response",
                          "duplicate", "near_duplicate", "too_long")

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_SPACES = re.compile(r"\s+")


@dataclass
class Kept:
    source: str
    line: int
    messages: list[dict]
    sample: RenderedSample  # fitted to max_length


@dataclass
class Rejected:
    source: str
    line: int
    reason: str
    detail: str
    row: object = None


@dataclass
class CleanResult:
    kept: list[Kept] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    repairs: Counter = field(default_factory=Counter)
    lengths: list[tuple[int, int]] = field(default_factory=list)  # (prompt, response) tokens of every rendered row
    rows_read: int = 0

    def reasons(self) -> dict[str, int]:
        counts = Counter(r.reason for r in self.rejected)
        return {reason: counts[reason] for reason in REASONS if counts[reason]}


def repair_text(text: str, repairs: Counter) -> str:
    """Fixes line endings, control characters and invisible spaces; leaves CJK and full-width text alone."""
    fixed = text
    if "\r" in fixed:
        fixed = fixed.replace("\r\n", "\n").replace("\r", "\n")
        repairs["line_endings"] += 1
    if _CONTROL.search(fixed):
        fixed = _CONTROL.sub("", fixed)
        repairs["control_characters"] += 1
    if _ZERO_WIDTH.search(fixed) or "\u00a0" in fixed:
        fixed = _ZERO_WIDTH.sub("", fixed).replace("\u00a0", " ")
        repairs["invisible_spaces"] += 1
    if fixed != fixed.strip():
        fixed = fixed.strip()
        repairs["surrounding_whitespace"] += 1
    return fixed


def dedup_text(messages: list[dict]) -> str:
    """The normalized conversation that duplicates are found on: lowercased, whitespace collapsed."""
    return _SPACES.sub(" ", "\n".join(f"{m['role']}:{m.get('metadata', '')}{m['content']}" for m in messages)).lower()


def lsh_bands(threshold: float, num_perm: int, false_negative_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows per band) minimizing the weighted false-positive and false-negative areas around the
    threshold, as datasketch's MinHashLSH chooses them. Missing a duplicate is weighted up: a false candidate
    only costs one signature comparison, which then rejects it."""
    similarity = np.linspace(0.0, 1.0, 501)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        candidate = 1 - (1 - similarity ** rows) ** bands
        false_positive = candidate[similarity < threshold].sum() / 500
        false_negative = (1 - candidate[similarity >= threshold]).sum() / 500
        error = (1 - false_negative_weight) * false_positive + false_negative_weight * false_negative
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


class NearDuplicateIndex:
    """MinHash signatures of character 5-grams in banded LSH buckets.

    Written here rather than taken from datasketch: its MinHash hashes each shingle with SHA-1 in Python and
    builds its permutations per object, which alone caps cleaning far below 3,000 rows/s on 2 cores. Here a
    row's signature is a few numpy operations (multiply-shift hashing), and the bands are chosen as datasketch
    chooses them. 64 permutations: the Jaccard estimate's standard error is about 0.04 at 0.9, and halving
    the default 128 took the 50,000-row benchmark from about 2,700 to 4,000 rows/s."""

    def __init__(self, threshold: float, num_perm: int = 64, ngram: int = 5):
        self.threshold, self.ngram = threshold, ngram
        rng = np.random.RandomState(1)  # fixed: the same rows are found near-duplicate on every run
        self.a = (rng.randint(0, 1 << 62, size=num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.randint(0, 1 << 62, size=num_perm, dtype=np.uint64)
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.buckets = [{} for _ in range(self.bands)]
        self.texts = {}

    def signatures_of(self, texts: list[str], group: int = 32) -> np.ndarray:
        """One signature row per text. Groups of 32 texts share a few numpy operations: larger groups are
        slower, their hash matrix no longer fits in the CPU caches (measured: 88 us/row at 32, 405 at 512)."""
        if len(texts) > group:
            return np.concatenate([self.signatures_of(texts[i:i + group], group)
                                   for i in range(0, len(texts), group)])
        shingles, starts, offset = [], [], 0
        for text in texts:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
            if len(codes) < self.ngram:
                codes = np.concatenate([codes, np.zeros(self.ngram - len(codes), dtype=np.uint64)])
            width = len(codes) - self.ngram + 1
            hashed = np.zeros(width, dtype=np.uint64)
            with np.errstate(over="ignore"):  # wrap-around multiplication is the hash
                for k in range(self.ngram):
                    hashed = hashed * np.uint64(1000003) + codes[k:k + width]
            starts.append(offset)
            shingles.append(hashed)
            offset += width
        flat = np.concatenate(shingles)
        with np.errstate(over="ignore"):
            permuted = (self.a[:, None] * flat[None, :] + self.b[:, None]) >> np.uint64(32)
        return np.ascontiguousarray(np.minimum.reduceat(permuted, starts, axis=1).T, dtype=np.uint32)

    def find_or_add(self, key: str, signature: np.ndarray, text: str) -> str | None:
        """The key of an earlier near-duplicate, or None (and the row is added under `key`). LSH only proposes
        candidates; the decision is the exact Jaccard similarity of the two texts' 5-gram sets, so the noise
        of the signature estimate never rejects a row."""
        raw, width = signature.tobytes(), self.rows * signature.itemsize
        band_keys = [raw[i * width:(i + 1) * width] for i in range(self.bands)]
        checked = set()
        for bucket, band_key in zip(self.buckets, band_keys):
            for other in bucket.get(band_key, ()):
                if other not in checked and self.jaccard(text, self.texts[other]) >= self.threshold:
                    return other
                checked.add(other)
        for bucket, band_key in zip(self.buckets, band_keys):
            bucket.setdefault(band_key, []).append(key)
        self.texts[key] = text
        return None

    def jaccard(self, a: str, b: str) -> float:
        n = self.ngram
        shingles_a = {a[i:i + n] for i in range(max(1, len(a) - n + 1))}
        shingles_b = {b[i:i + n] for i in range(max(1, len(b) - n + 1))}
        return len(shingles_a & shingles_b) / len(shingles_a | shingles_b)


class RowChecker:
    """The per-row work, free of cross-row state so that it can run in worker processes: parse, convert,
    repair, filter, hash, and render in batches (the tokenizer encodes a batch on all cores)."""

    def __init__(self, config: CleanArguments, renderer: ChatRenderer, system_prompt: str | None,
                 enabled: bool, file_formats: dict[str, str]):
        self.config, self.renderer, self.system_prompt, self.enabled = config, renderer, system_prompt, enabled
        self.file_formats = file_formats
        self.boilerplate = [phrase.lower() for phrase in config.boilerplate]
        self.near = NearDuplicateIndex(config.near_dedup_threshold) if enabled and config.near_dedup else None
        self.max_token_chars = max(len(token) for token in renderer.tokenizer.get_vocab())

    def check_batch(self, rows: list[SourceRow]) -> tuple[list, Counter]:
        """Per row: a _Reject, or (messages, normalized text, digest, signature row, rendered sample or
        MessageError). The
        signatures come back as one array (one row per passing row): far cheaper to send between processes
        than an array per row."""
        repairs, results, passed = Counter(), [], []
        for source_row in rows:
            try:
                messages, text = self._check_text(source_row, repairs)
            except _Reject as reject:
                results.append(reject)
                continue
            passed.append(len(results))
            results.append((messages, text))
        texts = [results[i][1] for i in passed]
        signatures = self.near.signatures_of(texts) if self.near is not None and texts else None
        samples = self.renderer.render_batch([results[i][0] for i in passed])
        for row, (i, sample) in enumerate(zip(passed, samples)):
            messages, text = results[i]
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest() if text is not None else None
            results[i] = (messages, text, digest, None if signatures is None else row, sample)
        return results, repairs, signatures

    def _check_text(self, source_row: SourceRow, repairs: Counter) -> tuple[list[dict], str | None]:
        if source_row.error:
            raise _Reject(source_row.error_reason or "bad_json", source_row.error)
        messages = self._messages(source_row)
        if self.enabled:
            for message in messages:
                message["content"] = repair_text(message["content"], repairs)
        self._check_structure(messages)
        max_length, chars = self.renderer.max_length, sum(len(m["content"]) for m in messages)
        if max_length is not None and chars > max_length * self.max_token_chars:
            # certainly too long: neither hashed nor tokenized (a single 10 MB row would take seconds)
            raise _Reject("too_long", f"{chars} characters: over {max_length} tokens")
        return messages, (self._check_content(messages) if self.enabled else None)

    def _messages(self, source_row: SourceRow) -> list[dict]:
        row_format = detect_format(source_row.row)
        file_format = self.config.data_format
        if file_format == "auto":
            file_format = self.file_formats.get(source_row.source)
        if row_format is None:
            raise _Reject("malformed_record", "no known fields (alpaca instruction/output, sharegpt conversations, "
                          "openai messages, or prompt/completion)")
        if file_format is not None and row_format != file_format:
            raise _Reject("mixed_format", f"a {row_format} row in a {file_format} file")
        try:
            return to_messages(source_row.row, row_format, self.system_prompt)
        except FieldError as exc:
            raise _Reject("malformed_record", str(exc)) from exc

    def _check_structure(self, messages: list[dict]) -> None:
        for message in messages:
            if message["role"] == "user" and not message["content"].strip():
                raise _Reject("empty_instruction", "a user message is empty")
            if message["role"] == "assistant" and not message["content"].strip():
                raise _Reject("empty_response", "an assistant message is empty")
        try:
            validate_messages(messages)
        except MessageError as exc:
            raise _Reject("role_order", str(exc)) from exc

    def _check_content(self, messages: list[dict]) -> str:
        """The text filters; returns the normalized text that duplicates are found on."""
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        for phrase in self.boilerplate:
            if any(phrase in reply.lower() for reply in replies):
                raise _Reject("boilerplate", f"a reply contains {phrase!r}")
        if len(replies[-1]) < self.config.min_response_chars:
            raise _Reject("short_response", f"{len(replies[-1])} characters < {self.config.min_response_chars}")
        return dedup_text(messages)


def first_formats(rows: list[SourceRow]) -> dict[str, str]:
    """Each file's format: the one its first readable row has."""
    formats = {}
    for source_row in rows:
        if source_row.source not in formats:
            row_format = detect_format(source_row.row)
            if row_format is not None:
                formats[source_row.source] = row_format
    return formats


class Cleaner:
    """The cross-row decisions, in file order, so the first occurrence of a duplicate wins."""

    def __init__(self, config: CleanArguments, renderer: ChatRenderer, near: "NearDuplicateIndex | None"):
        self.config, self.renderer = config, renderer
        self.seen = {}
        self.near = near  # the index whose hash functions made the signatures (in this process, not a worker's)
        self.result = CleanResult()

    def add_batch(self, rows: list[SourceRow], results: list, repairs: Counter, signatures) -> None:
        self.result.repairs.update(repairs)
        for source_row, outcome in zip(rows, results):
            self.result.rows_read += 1
            try:
                if isinstance(outcome, _Reject):
                    raise outcome
                messages, text, digest, signature_row, sample = outcome
                signature = None if signature_row is None else signatures[signature_row]
                self.result.kept.append(self._decide(source_row, messages, text, digest, signature, sample))
            except _Reject as reject:
                if self.config.strict and reject.reason in MALFORMED:
                    raise UserError(f"{source_row.source}:{source_row.line}: {reject.reason}: {reject.detail} "
                                    "(--strict)") from reject
                self.result.rejected.append(Rejected(source_row.source, source_row.line, reject.reason,
                                                     reject.detail, source_row.row))

    def _decide(self, source_row: SourceRow, messages, text, digest, signature, sample) -> Kept:
        key = f"{source_row.source}:{source_row.line}"
        if digest is not None:
            if digest in self.seen:
                raise _Reject("duplicate", f"same as {self.seen[digest]}")
            self.seen[digest] = key
        if signature is not None and self.near is not None:
            twin = self.near.find_or_add(key, signature, text)
            if twin is not None:
                raise _Reject("near_duplicate", f"near {twin}")
        if isinstance(sample, MessageError):
            raise _Reject("role_order", str(sample))
        supervised = sample.num_supervised
        self.result.lengths.append((len(sample.input_ids) - supervised, supervised))
        try:
            return Kept(source_row.source, source_row.line, messages, self.renderer.fit(sample))
        except SampleTooLong as exc:
            raise _Reject("too_long", str(exc)) from exc


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


BATCH_ROWS = 512
PARALLEL_MIN_ROWS = 4096  # below this, starting worker processes costs more than it saves
_WORKER_CHECKER = None


def _check_in_worker(rows):
    return _WORKER_CHECKER.check_batch(rows)


def clean_rows(rows, config: CleanArguments, renderer: ChatRenderer, system_prompt: str | None = None,
               enabled: bool = True, progress: bool = False) -> CleanResult:
    """Cleans `rows` (SourceRows in file order). Large inputs are checked in one worker process per core
    (forked, so they share the tokenizer), while the duplicate decisions stay in order here."""
    global _WORKER_CHECKER
    rows = list(rows)
    if not enabled:
        config = CleanArguments(**{**config.__dict__, "near_dedup": False})
    checker = RowChecker(config, renderer, system_prompt, enabled, first_formats(rows))
    cleaner = Cleaner(config, renderer, checker.near)
    batches = [rows[i:i + BATCH_ROWS] for i in range(0, len(rows), BATCH_ROWS)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="cleaning", unit="rows", mininterval=1.0)
    workers = min(os.cpu_count() or 1, len(batches))
    if len(rows) >= PARALLEL_MIN_ROWS and workers > 1 and "fork" in mp.get_all_start_methods():
        _WORKER_CHECKER = checker
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one encoding thread per worker process
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            outcomes = pool.map(_check_in_worker, batches)
            for batch, outcome in zip(batches, outcomes):
                cleaner.add_batch(batch, *outcome)
                if bar:
                    bar.update(len(batch))
        _WORKER_CHECKER = None
    else:
        for batch in batches:
            cleaner.add_batch(batch, *checker.check_batch(batch))
            if bar:
                bar.update(len(batch))
    if bar:
        bar.close()
    return cleaner.result
