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
import re
from collections import Counter
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
    chooses them."""

    def __init__(self, threshold: float, num_perm: int = 128, ngram: int = 5):
        self.threshold, self.ngram = threshold, ngram
        rng = np.random.RandomState(1)  # fixed: the same rows are found near-duplicate on every run
        self.a = (rng.randint(0, 1 << 62, size=num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.randint(0, 1 << 62, size=num_perm, dtype=np.uint64)
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.buckets = [{} for _ in range(self.bands)]
        self.signatures = {}

    def signature(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        if len(codes) < self.ngram:
            codes = np.concatenate([codes, np.zeros(self.ngram - len(codes), dtype=np.uint64)])
        width = len(codes) - self.ngram + 1
        shingles = np.zeros(width, dtype=np.uint64)
        with np.errstate(over="ignore"):  # wrap-around multiplication is the hash
            for k in range(self.ngram):
                shingles = shingles * np.uint64(1000003) + codes[k:k + width]
            hashed = (self.a[:, None] * shingles[None, :] + self.b[:, None]) >> np.uint64(32)
        return hashed.min(axis=1).astype(np.uint32)

    def find_or_add(self, key: str, text: str) -> str | None:
        """The key of an earlier near-duplicate of `text`, or None (and `text` is added)."""
        signature = self.signature(text)
        band_keys = [signature[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        for bucket, band_key in zip(self.buckets, band_keys):
            for other in bucket.get(band_key, ()):
                if np.mean(self.signatures[other] == signature) >= self.threshold:
                    return other
        for bucket, band_key in zip(self.buckets, band_keys):
            bucket.setdefault(band_key, []).append(key)
        self.signatures[key] = signature
        return None


class Cleaner:
    """Applies the filters in file order, so the first occurrence of a duplicate wins. Rows that pass the
    text filters are rendered in batches, so the tokenizer encodes them on all cores."""

    BATCH = 512

    def __init__(self, config: CleanArguments, renderer: ChatRenderer, system_prompt: str | None = None,
                 enabled: bool = True):
        self.config, self.renderer, self.system_prompt, self.enabled = config, renderer, system_prompt, enabled
        self.boilerplate = [phrase.lower() for phrase in config.boilerplate]
        self.seen = {}
        self.near = NearDuplicateIndex(config.near_dedup_threshold) if enabled and config.near_dedup else None
        self.result = CleanResult()
        self.file_formats = {}
        self.pending = []  # (order, source_row, messages) waiting to be rendered
        self.ordered = []  # (order, Kept | Rejected)
        self.max_token_chars = max(len(token) for token in renderer.tokenizer.get_vocab())

    def add(self, source_row: SourceRow) -> None:
        order = self.result.rows_read
        self.result.rows_read += 1
        try:
            messages = self._check_text(source_row)
        except _Reject as reject:
            self._reject(order, source_row, reject)
            return
        self.pending.append((order, source_row, messages))
        if len(self.pending) >= self.BATCH:
            self.flush()

    def finish(self) -> CleanResult:
        self.flush()
        self.ordered.sort(key=lambda item: item[0])
        self.result.kept = [item for _, item in self.ordered if isinstance(item, Kept)]
        self.result.rejected = [item for _, item in self.ordered if isinstance(item, Rejected)]
        return self.result

    def _reject(self, order: int, source_row: SourceRow, reject: "_Reject") -> None:
        if self.config.strict and reject.reason in MALFORMED:
            raise UserError(f"{source_row.source}:{source_row.line}: {reject.reason}: {reject.detail} (--strict)")
        self.ordered.append((order, Rejected(source_row.source, source_row.line, reject.reason, reject.detail,
                                             source_row.row)))

    def _check_text(self, source_row: SourceRow) -> list[dict]:
        if source_row.error:
            raise _Reject(source_row.error_reason or "bad_json", source_row.error)
        messages = self._messages(source_row)
        if self.enabled:
            for message in messages:
                message["content"] = repair_text(message["content"], self.result.repairs)
        self._check_structure(messages)
        max_length, chars = self.renderer.max_length, sum(len(m["content"]) for m in messages)
        if max_length is not None and chars > max_length * self.max_token_chars:
            # certainly too long: neither hashed nor tokenized (a single 10 MB row would take seconds)
            raise _Reject("too_long", f"{chars} characters: over {max_length} tokens")
        if self.enabled:
            self._check_content(messages, source_row)
        return messages

    def _messages(self, source_row: SourceRow) -> list[dict]:
        row_format = detect_format(source_row.row)
        file_format = self.config.data_format
        if file_format == "auto":
            if row_format is not None:
                self.file_formats.setdefault(source_row.source, row_format)  # the first readable row decides
            file_format = self.file_formats.get(source_row.source)
        if row_format is None:
            raise _Reject("malformed_record", "no known fields (alpaca instruction/output, sharegpt conversations, "
                          "openai messages, or prompt/completion)")
        if file_format is not None and row_format != file_format:
            raise _Reject("mixed_format", f"a {row_format} row in a {file_format} file")
        try:
            return to_messages(source_row.row, row_format, self.system_prompt)
        except FieldError as exc:
            raise _Reject("malformed_record", str(exc))

    def _check_structure(self, messages: list[dict]) -> None:
        for message in messages:
            if message["role"] == "user" and not message["content"].strip():
                raise _Reject("empty_instruction", "a user message is empty")
            if message["role"] == "assistant" and not message["content"].strip():
                raise _Reject("empty_response", "an assistant message is empty")
        try:
            validate_messages(messages)
        except MessageError as exc:
            raise _Reject("role_order", str(exc))

    def _check_content(self, messages: list[dict], source_row: SourceRow) -> None:
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        for phrase in self.boilerplate:
            if any(phrase in reply.lower() for reply in replies):
                raise _Reject("boilerplate", f"a reply contains {phrase!r}")
        if len(replies[-1]) < self.config.min_response_chars:
            raise _Reject("short_response", f"{len(replies[-1])} characters < {self.config.min_response_chars}")
        text = dedup_text(messages)
        key = f"{source_row.source}:{source_row.line}"
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in self.seen:
            raise _Reject("duplicate", f"same as {self.seen[digest]}")
        self.seen[digest] = key
        if self.near is not None:
            twin = self.near.find_or_add(key, text)
            if twin is not None:
                raise _Reject("near_duplicate", f"near {twin}")

    def flush(self) -> None:
        samples = self.renderer.render_batch([messages for _, _, messages in self.pending])
        for (order, source_row, messages), sample in zip(self.pending, samples):
            try:
                self.ordered.append((order, self._fit(source_row, messages, sample)))
            except _Reject as reject:
                self._reject(order, source_row, reject)
        self.pending = []

    def _fit(self, source_row: SourceRow, messages: list[dict], sample) -> Kept:
        if isinstance(sample, MessageError):
            raise _Reject("role_order", str(sample))
        supervised = sample.num_supervised
        self.result.lengths.append((len(sample.input_ids) - supervised, supervised))
        try:
            return Kept(source_row.source, source_row.line, messages, self.renderer.fit(sample))
        except SampleTooLong as exc:
            raise _Reject("too_long", str(exc))


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def clean_rows(rows, config: CleanArguments, renderer: ChatRenderer, system_prompt: str | None = None,
               enabled: bool = True, progress: bool = False) -> CleanResult:
    cleaner = Cleaner(config, renderer, system_prompt, enabled)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="cleaning", unit="rows", mininterval=1.0)
    for source_row in rows:
        cleaner.add(source_row)
    return cleaner.finish()
