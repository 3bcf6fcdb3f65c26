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


class NearDuplicateIndex:
    """MinHash signatures of character 5-grams, indexed with datasketch's LSH.

    The signatures are computed here, vectorized with numpy, because datasketch's MinHash.update hashes each
    shingle with SHA-1 in Python, which alone would cap cleaning far below 3,000 rows/s; datasketch still
    chooses the bands for the threshold and keeps the index."""

    PRIME = np.uint64((1 << 61) - 1)

    def __init__(self, threshold: float, num_perm: int = 128, ngram: int = 5):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        rng = np.random.RandomState(1)  # fixed: the same rows are found near-duplicate on every run
        self.a = rng.randint(1, 1 << 32, size=num_perm, dtype=np.uint64)
        self.b = rng.randint(0, 1 << 32, size=num_perm, dtype=np.uint64)
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.signatures = {}

    def signature(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        if len(codes) < self.ngram:
            codes = np.concatenate([codes, np.zeros(self.ngram - len(codes), dtype=np.uint64)])
        width = len(codes) - self.ngram + 1
        hashes = np.zeros(width, dtype=np.uint64)
        with np.errstate(over="ignore"):  # wrap-around multiplication is the hash
            for k in range(self.ngram):
                hashes = hashes * np.uint64(1000003) + codes[k:k + width]
            hashes = np.unique((hashes ^ (hashes >> np.uint64(29))) & np.uint64(0xFFFFFFFF))
            permuted = (self.a[:, None] * hashes[None, :] + self.b[:, None]) % self.PRIME
        return permuted.min(axis=1) & np.uint64(0xFFFFFFFF)

    def find_or_add(self, key: str, text: str) -> str | None:
        """The key of an earlier near-duplicate of `text`, or None (and `text` is added)."""
        from datasketch import MinHash

        signature = self.signature(text)
        minhash = MinHash(num_perm=self.num_perm, hashvalues=signature, scheme="legacy")
        for other in self.lsh.query(minhash):
            if np.mean(self.signatures[other] == signature) >= self.threshold:
                return other
        self.lsh.insert(key, minhash)
        self.signatures[key] = signature
        return None


class Cleaner:
    """Applies the filters to rows one at a time, in file order, so the first occurrence of a duplicate wins."""

    def __init__(self, config: CleanArguments, renderer: ChatRenderer, system_prompt: str | None = None,
                 enabled: bool = True):
        self.config, self.renderer, self.system_prompt, self.enabled = config, renderer, system_prompt, enabled
        self.boilerplate = [phrase.lower() for phrase in config.boilerplate]
        self.seen = {}
        self.near = NearDuplicateIndex(config.near_dedup_threshold) if enabled and config.near_dedup else None
        self.result = CleanResult()
        self.file_formats = {}
        vocab = renderer.tokenizer.get_vocab()
        self.max_token_chars = max(len(token) for token in vocab)  # bounds tokens from below by characters

    def add(self, source_row: SourceRow) -> None:
        self.result.rows_read += 1
        try:
            kept = self._check(source_row)
        except _Reject as reject:
            rejected = Rejected(source_row.source, source_row.line, reject.reason, reject.detail, source_row.row)
            if self.config.strict and reject.reason in MALFORMED:
                raise UserError(f"{source_row.source}:{source_row.line}: {reject.reason}: {reject.detail} (--strict)")
            self.result.rejected.append(rejected)
            return
        self.result.kept.append(kept)

    def _check(self, source_row: SourceRow) -> Kept:
        if source_row.error:
            raise _Reject(source_row.error_reason or "bad_json", source_row.error)
        messages = self._messages(source_row)
        if self.enabled:
            for message in messages:
                message["content"] = repair_text(message["content"], self.result.repairs)
        self._check_structure(messages)
        if self.enabled:
            self._check_content(messages, source_row)
        return Kept(source_row.source, source_row.line, messages, self._render(messages))

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

    def _render(self, messages: list[dict]) -> RenderedSample:
        max_length = self.renderer.max_length
        chars = sum(len(m["content"]) for m in messages)
        if max_length is not None and chars > max_length * self.max_token_chars:
            # certainly too long: skip tokenizing it (a single 10 MB row would take seconds)
            raise _Reject("too_long", f"{chars} characters: over {max_length} tokens")
        try:
            sample = self.renderer.render(messages, fit=False)
        except MessageError as exc:
            raise _Reject("role_order", str(exc))
        supervised = sample.num_supervised
        self.result.lengths.append((len(sample.input_ids) - supervised, supervised))
        try:
            return self.renderer.fit(sample)
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
    return cleaner.result
