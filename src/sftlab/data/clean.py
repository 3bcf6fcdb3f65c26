"""The cleaning stage: named filters, each with a reason code. Every row is either kept or rejected with one
reason, so kept + rejected = rows read; nothing is dropped silently.

Reason codes, in the order they are checked:
  bad_json, invalid_utf8   the line could not be read
  invalid_text             a string that cannot be encoded as UTF-8 (an escaped lone surrogate, "\ud800")
  too_deep                 nested past 32 levels (no chat record is; it would crash a recursive reader)
  too_large                over max_row_bytes (4 MiB): rejected before it is parsed, so no row can take the
                           machine's memory
  mixed_format             the row is of another format than --data_format forces (with auto, each row is
                           read in its own format, and the report counts the formats of each file)
  malformed_record         a field is missing or of the wrong type
  invalid_tool_call        a function call that is not JSON, has no name, or whose arguments are not a JSON object
  empty_instruction        a user message is empty
  empty_response           an assistant message is empty
  role_order               the roles are not user -> assistant [-> tool -> assistant ...]; a tool result
                           must follow an assistant's function call
  tools_unsupported        the row has tool calls, the model's chat template renders no tools, and
                           tool_fallback is off
  boilerplate              a reply contains a configured phrase ("As an AI language model", ...)
  short_response           the last reply is shorter than min_response_chars
  duplicate                the same conversation as an earlier row, after normalization
  near_duplicate           MinHash/LSH: estimated 5-gram Jaccard >= the threshold with an earlier row
  too_long                 over max_length tokens, measured with the model's tokenizer and chat template (only
                           with a model: without one, lengths are counted in characters and nothing is too long)

Text repairs (counted, never a rejection): CRLF and CR to LF, control characters removed, zero-width spaces
and NBSP fixed, surrounding whitespace stripped. Chinese text and full-width punctuation are never altered.
Bidirectional-override characters (U+202A-U+202E, U+2066-U+2069) are kept, since right-to-left text needs some,
and counted (bidi_controls_kept), since they can also hide what a text says.
With tool_fallback off, tools a template cannot render are dropped from rows that only list them (tools_dropped).

This module checks one row at a time (RowChecker) and holds what a row becomes (Kept, Rejected, the CleanResult);
cleaner.py streams the rows through it and makes the cross-row decisions (duplicates, near duplicates).
"""

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sftlab.chat_format import ChatRenderer, MessageError, RenderedSample, TemplateRefused
from sftlab.chat_tools import calls_text, has_tool_parts, message_text, validate_messages
from sftlab.config import CleanArguments
from sftlab.data.convert import NO_FORMAT, FieldError, ToolCallError, check_format_name, detect_format, to_messages
from sftlab.data.lengths import Lengths
from sftlab.data.load import SourceRow
from sftlab.data.near_dedup import MinHash
from sftlab.errors import UserError

MALFORMED = ("bad_json", "invalid_utf8", "invalid_text", "too_deep", "too_large", "mixed_format", "malformed_record",
             "invalid_tool_call", "role_order")
REASONS = MALFORMED[:8] + ("empty_instruction", "empty_response", "role_order", "tools_unsupported", "boilerplate",
                          "short_response",
                          "duplicate", "near_duplicate", "too_long")

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_SPACES = re.compile(r"\s+")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class Rejection:
    """Why a row is rejected, as the per-row checks return it: plain data, so that it crosses from a worker
    process intact (exceptions do not: one whose __init__ takes other arguments than it gives Exception cannot
    be unpickled, and the pool then breaks)."""

    reason: str
    detail: str


@dataclass
class Kept:
    source: str
    line: int
    messages: list[dict]
    sample: RenderedSample | None  # fitted to max_length; None when cleaning without a model
    tools: list[dict] | None = None  # the functions the conversation may call (OpenAI's `tools`)
    record_json: str | None = None  # record_of(messages, tools) as JSON (made in the worker that checked it)


def record_of(messages: list[dict], tools: list | None) -> dict:
    """A conversation as clean.jsonl, heldout.jsonl and the prepared shards keep it: OpenAI's row form."""
    return {"messages": messages, **({"tools": tools} if tools else {})}


@dataclass
class Checked:
    """A row that passed the per-row checks, with what the cross-row decisions need."""

    messages: list[dict]
    tools: list[dict] | None
    text: str | None  # normalized for duplicate detection (None when cleaning is off)
    digest: bytes | None  # of the text and the tool key: the exact-duplicate key
    tool_key: bytes  # near duplicates are looked for among rows with the same one
    signature_row: int | None  # its row in the batch's signature array, for near-duplicate detection
    sample: RenderedSample | Rejection | None  # rendered whole (before max_length), why it cannot be, or no model
    record_json: str  # record_of(messages, tools) as JSON: serialized here, in the worker, not by the one
    #                   process that decides every row in order


@dataclass
class Rejected:
    source: str
    line: int
    reason: str
    detail: str
    row: object = None


@dataclass
class CleanResult:
    """What cleaning found: counts and length distributions, in memory whatever the number of rows. The kept and
    rejected rows themselves go to a sink (`clean_rows`'s collects them in `kept` and `rejected`; `data clean` and
    the preparation write them out as they come)."""

    kept: list[Kept] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    repairs: Counter = field(default_factory=Counter)
    lengths: Lengths = field(default_factory=Lengths)  # (prompt, response) of every rendered kept row
    unit: str = "tokens"  # of `lengths`: "characters" when cleaning without a model
    rows_read: int = 0
    formats: dict = field(default_factory=dict)  # source -> Counter of its rows' formats
    rejected_for: Counter = field(default_factory=Counter)  # reason -> rows
    kept_from: Counter = field(default_factory=Counter)  # source -> kept rows
    rejected_from: Counter = field(default_factory=Counter)  # source -> rejected rows
    without_system: int = 0  # kept rows without a system message (a template's default goes into them)

    @property
    def kept_count(self) -> int:
        return self.kept_from.total()

    @property
    def rejected_count(self) -> int:
        return self.rejected_from.total()

    def reasons(self) -> dict[str, int]:
        return {reason: self.rejected_for[reason] for reason in REASONS if self.rejected_for[reason]}

    def formats_by_file(self) -> dict[str, dict]:
        """Each file's formats, with how many readable rows have each (the report shows files that mix them)."""
        return {source: dict(counter.most_common()) for source, counter in self.formats.items()}

    COUNTERS = ("repairs", "rejected_for", "kept_from", "rejected_from")

    def to_state(self) -> dict:
        """The counts as JSON, for a resumed preparation (the rows themselves are in its shards)."""
        return {"unit": self.unit, "rows_read": self.rows_read, "without_system": self.without_system,
                "lengths": self.lengths.to_state(), **{name: dict(getattr(self, name)) for name in self.COUNTERS},
                "formats": {source: list(counter.items()) for source, counter in self.formats.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "CleanResult":
        return cls(unit=state["unit"], rows_read=state["rows_read"], without_system=state["without_system"],
                   lengths=Lengths.from_state(state["lengths"]),
                   **{name: Counter(state[name]) for name in cls.COUNTERS},
                   formats={source: Counter(dict(items)) for source, items in state["formats"].items()})


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
    if _BIDI.search(fixed):
        repairs["bidi_controls_kept"] += 1
    return fixed


def dedup_text(messages: list[dict]) -> str:
    """The normalized conversation that duplicates are found on: lowercased, whitespace collapsed."""
    return _SPACES.sub(" ", "\n".join(f"{m['role']}:{message_text(m)}" for m in messages)).lower()


def tool_key(messages: list[dict], tools: list | None) -> bytes:
    """What a tool-call row teaches beyond its text: the tool definitions and every function call's name and
    arguments, exactly. Rows are duplicates or near duplicates only when this is the same (b"" without tools):
    rows that differ only there teach different calls, which is the point of tool-call data. (Adding the tools'
    JSON to the near-duplicate text instead would make unrelated rows that share a long tool list look alike.)"""
    calls = [calls_text(m) for m in messages if m.get("tool_calls")]
    if not tools and not calls:
        return b""
    return hashlib.blake2b(json.dumps([tools or [], calls], sort_keys=True, ensure_ascii=False).encode(),
                           digest_size=16).digest()


class RowChecker:
    """The per-row work, free of cross-row state so that it can run in worker processes: parse, convert,
    repair, filter, hash, and render in batches (the tokenizer encodes a batch on all cores)."""

    def __init__(self, config: CleanArguments, renderer: ChatRenderer | None, system_prompt: str | None,
                 enabled: bool):
        try:
            check_format_name(config.data_format)  # before any row is read
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.config, self.renderer, self.system_prompt, self.enabled = config, renderer, system_prompt, enabled
        self.boilerplate = [phrase.lower() for phrase in config.boilerplate]
        self.minhash = MinHash(config.near_dedup_threshold) if enabled and config.near_dedup else None
        self.max_token_chars = max(map(len, renderer.tokenizer.get_vocab())) if renderer is not None else None

    def check_batch(self, rows: list[SourceRow]) -> tuple[list, Counter, np.ndarray | None, list]:
        """Per row a Rejection or a Checked; the text repairs; the near-duplicate signatures as one array (one row
        per passing row): far cheaper to send between processes than an array per row; and each readable row's
        format (None for a row that could not be read)."""
        repairs, results, passed = Counter(), [], []
        formats = [None if r.error is not None else detect_format(r.row) or "unknown" for r in rows]
        for source_row in rows:
            try:
                messages, tools, text = self._check_text(source_row, repairs)
            except Reject as reject:
                results.append(Rejection(reject.reason, reject.detail))
                continue
            passed.append(len(results))
            results.append((messages, tools, text))
        texts = [results[i][2] for i in passed]
        signatures = self.minhash.signatures_of(texts) if self.minhash is not None and texts else None
        samples = (self.renderer.render_batch([results[i][0] for i in passed], [results[i][1] for i in passed])
                   if self.renderer is not None else [None] * len(passed))
        for row, (i, sample) in enumerate(zip(passed, samples)):
            messages, tools, text = results[i]
            if isinstance(sample, MessageError):  # decided after the duplicate checks
                refused = isinstance(sample, TemplateRefused) and has_tool_parts(messages, tools)
                sample = Rejection("tools_unsupported" if refused else "role_order", str(sample))
            key = tool_key(messages, tools)
            digest = None if text is None else hashlib.blake2b(text.encode() + b"\0" + key, digest_size=16).digest()
            results[i] = Checked(messages, tools, text, digest, key, None if signatures is None else row, sample,
                                 json.dumps(record_of(messages, tools), ensure_ascii=False))
        return results, repairs, signatures, formats

    def _check_text(self, source_row: SourceRow, repairs: Counter) -> tuple[list[dict], list | None, str | None]:
        if source_row.error:
            raise Reject(source_row.error_reason or "bad_json", source_row.error)
        messages, tools = self._messages(source_row)
        if self.enabled:
            for message in messages:
                message["content"] = repair_text(message["content"], repairs)
        self._check_structure(messages)
        if not self.config.tool_fallback and self.renderer is not None and self.renderer.tool_dialect is None:
            tools = self._without_tools(messages, tools, repairs)
        max_length = self.renderer.max_length if self.renderer is not None else None
        chars = sum(len(message_text(m)) for m in messages)
        if max_length is not None and chars > max_length * self.max_token_chars:
            # certainly too long: neither hashed nor tokenized (a single 10 MB row would take seconds)
            raise Reject("too_long", f"{chars} characters: over {max_length} tokens")
        return messages, tools, (self._check_content(messages) if self.enabled else None)

    def _messages(self, source_row: SourceRow) -> tuple[list[dict], list | None]:
        row_format = detect_format(source_row.row)
        if row_format is None:
            raise Reject("malformed_record", NO_FORMAT)
        forced = self.config.data_format
        if forced != "auto" and row_format != forced:
            raise Reject("mixed_format", f"a {row_format} row, and data_format forces {forced}")
        try:
            return to_messages(source_row.row, row_format, self.system_prompt)
        except ToolCallError as exc:
            raise Reject("invalid_tool_call", str(exc)) from exc
        except FieldError as exc:
            raise Reject("malformed_record", str(exc)) from exc

    def _check_structure(self, messages: list[dict]) -> None:
        for message in messages:
            if message["role"] == "user" and not message["content"].strip():
                raise Reject("empty_instruction", "a user message is empty")
            if message["role"] == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
                raise Reject("empty_response", "an assistant message is empty")
        try:
            validate_messages(messages)
        except MessageError as exc:
            raise Reject("role_order", str(exc)) from exc

    @staticmethod
    def _without_tools(messages: list[dict], tools: list | None, repairs: Counter) -> None:
        """tool_fallback off, on a template that renders no tools: a row with calls or results is
        tools_unsupported; a row that only lists tools keeps its conversation, without them (None)."""
        if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            raise Reject("tools_unsupported", "the chat template renders no tools and tool_fallback is off: this "
                                               "row has function calls")
        if tools:
            repairs["tools_dropped"] += 1
        return None

    def _check_content(self, messages: list[dict]) -> str:
        """The text filters; returns the normalized text that duplicates are found on."""
        replies = [message_text(m) for m in messages if m["role"] == "assistant"]
        for phrase in self.boilerplate:
            if any(phrase in reply.lower() for reply in replies):
                raise Reject("boilerplate", f"a reply contains {phrase!r}")
        if len(replies[-1]) < self.config.min_response_chars:
            raise Reject("short_response", f"{len(replies[-1])} characters < {self.config.min_response_chars}")
        return dedup_text(messages)


class Reject(Exception):
    """Raised by a check to reject the row it is checking; caught in the same process (workers return a
    Rejection instead). Pickles all the same, like every exception sftlab defines."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail

    def __reduce__(self):
        return type(self), (self.reason, self.detail)


