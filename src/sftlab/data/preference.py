"""Preference pairs for `sftlab dpo`: one prompt, a chosen and a rejected reply. Read through the same loader as
SFT data (a bad row is named by file and line), in the forms the field uses, checked for the defects only a pair
can have, and rendered through the one renderer, so the prompt a pair is trained on is the prompt chat sends.

Forms, told apart per row by its keys (a dataset's `columns` maps other names onto them):
- TRL's: `prompt`, `chosen`, `rejected`, each a string or a message list (a reply list ends in the assistant's
  message), or `chosen`/`rejected` alone as whole conversations that share their prompt (TRL's implicit prompt);
- LLaMA-Factory's ShareGPT: `conversations` holds the prompt turns, `chosen`/`rejected` are {from, value} turns;
  OpenAI's `messages` likewise, with {role, content} replies;
- Alpaca: instruction/input (and system, history) with `chosen`/`rejected` strings, or `output: [chosen, rejected]`.

Text is repaired as SFT cleaning repairs it (line endings, control characters, invisible and surrounding spaces;
counted in the report) before a pair is checked. Every row that is not kept is counted with a reason: the
loader's (bad_json, too_large, ...), malformed_record, role_order, and the pair's own: empty_side,
identical_sides, prompt_mismatch, duplicate_pair, too_long (either side over max_length: a pair is never
truncated, since a cut reply would teach the model to stop mid-answer).
"""

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field

from sftlab.chat_format import IGNORE_INDEX, ChatRenderer, MessageError
from sftlab.chat_tools import message_text
from sftlab.data.clean import repair_text
from sftlab.data.convert import FieldError, alpaca_to_messages, openai_to_messages, sharegpt_to_messages
from sftlab.data.lengths import length_stats
from sftlab.data.load import SourceRow
from sftlab.data.sources import weighted

PAIR_FIELDS = ("prompt", "chosen", "rejected", "conversations", "messages", "instruction", "input", "output",
               "system", "history", "tools")  # what a dataset's `columns` may map onto
PAIR_REASONS = ("empty_side", "identical_sides", "prompt_mismatch", "duplicate_pair", "too_long")
SIDES = ("chosen", "rejected")


class PairDefect(ValueError):
    """A row that cannot become a pair that teaches: a pair's own defect (PAIR_REASONS), or the loader's reason for
    a row it could not read (bad_json, too_large, ...); `reason` is its code in the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # pickled with its own arguments (the default would call it with the message alone)
        return type(self), (self.reason, self.detail)


@dataclass
class Pair:
    prompt: list[dict]  # the conversation up to the reply (it ends in a user or tool turn)
    chosen: dict  # the assistant's preferred reply
    rejected: dict
    tools: list[dict] | None = None

    def record(self) -> dict:
        """TRL's conversational preference row (heldout.jsonl keeps the held-out pairs so)."""
        return {"prompt": self.prompt, "chosen": [self.chosen], "rejected": [self.rejected],
                **({"tools": self.tools} if self.tools else {})}

    @classmethod
    def from_record(cls, record: dict) -> "Pair":
        """The pair a record() (a held-out line) holds."""
        return cls(record["prompt"], record["chosen"][0], record["rejected"][0], record.get("tools"))

    def key(self) -> bytes:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True, ensure_ascii=False).encode()).digest()


def pair_format(row: dict) -> str:
    """Which form a row is in (the names pair_of reads), by its keys."""
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "openai"
    if "instruction" in row:
        return "alpaca"
    return "trl" if "prompt" in row else "trl_implicit"


def pair_of(row, system_prompt: str | None = None, repairs: Counter | None = None) -> Pair:
    """A source row -> a Pair; FieldError names a missing or mistyped field, PairDefect a pair that cannot teach.
    `repairs`: apply SFT cleaning's text repairs (line endings, control characters, invisible and surrounding
    spaces) to every message, counted here, before the pair is checked."""
    if not isinstance(row, dict):
        raise FieldError("<row>", f"expected a JSON object, got {type(row).__name__}")
    if "chosen" not in row and isinstance(row.get("output"), list) and len(row["output"]) == 2:
        row = {**row, "chosen": row["output"][0], "rejected": row["output"][1]}  # LLaMA-Factory's older alpaca form
    for side in SIDES:
        if side not in row:
            raise FieldError(side, "missing (a preference row has a chosen and a rejected reply)")
    (prompt, chosen, tools), (other_prompt, rejected, _) = (_conversation(row, side, system_prompt) for side in SIDES)
    if repairs is not None:  # the prompt once: the other side's copy is repaired alike, not counted again
        for messages, counter in ((prompt + [chosen, rejected], repairs), (other_prompt, Counter())):
            for message in messages:
                message["content"] = repair_text(message["content"], counter)
    if prompt != other_prompt:
        raise PairDefect("prompt_mismatch", f"the chosen and rejected conversations differ before the reply "
                         f"(at message {_first_difference(prompt, other_prompt)})")
    pair = Pair(prompt, chosen, rejected, tools)
    for side in SIDES:
        reply = getattr(pair, side)
        if not (message_text(reply) or "").strip() and not reply.get("tool_calls"):
            raise PairDefect("empty_side", f"{side} is empty")
    if _same_reply(chosen, rejected):
        raise PairDefect("identical_sides", "chosen and rejected are the same reply")
    return pair


def _conversation(row: dict, side: str, system_prompt: str | None) -> tuple[list[dict], dict, list | None]:
    """(prompt messages, reply, tools) of one side, through the SFT converters (the same field errors)."""
    value, form = row[side], pair_format(row)
    if form == "sharegpt":
        turn = {"from": "gpt", "value": value} if isinstance(value, str) else value
        messages, tools = sharegpt_to_messages({**row, "conversations": [*_list(row, "conversations"), turn]},
                                               system_prompt)
    elif form == "openai":
        message = {"role": "assistant", "content": value} if isinstance(value, str) else value
        messages, tools = openai_to_messages({**row, "messages": [*_list(row, "messages"), message]}, system_prompt)
    elif form == "alpaca":
        messages, tools = alpaca_to_messages({**row, "output": value}, system_prompt), None
    else:
        prompt = row.get("prompt", [])
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        reply = [{"role": "assistant", "content": value}] if isinstance(value, str) else value
        if not isinstance(prompt, list) or not isinstance(reply, list):
            raise FieldError("prompt" if not isinstance(prompt, list) else side,
                             "expected a string or a list of messages")
        messages, tools = openai_to_messages({**row, "messages": [*prompt, *reply]}, system_prompt)
    if not messages or messages[-1]["role"] != "assistant":
        raise FieldError(side, "expected the assistant's reply last")
    return messages[:-1], messages[-1], tools


def _list(row: dict, name: str) -> list:
    if not isinstance(row.get(name), list):
        raise FieldError(name, "expected a list of turns (the prompt)")
    return row[name]


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _same_reply(a: dict, b: dict) -> bool:
    return (message_text(a) or "").strip() == (message_text(b) or "").strip() and a.get("tool_calls") == \
        b.get("tool_calls")


def render_pair(renderer: ChatRenderer, pair: Pair) -> dict:
    """{"prompt_ids", "chosen_ids", "rejected_ids"}, as TRL's DPO collator takes them: the prompt exactly as the
    generation prompt renders it, each reply through its terminator (the tokens the loss is taken on; whatever
    the template writes after the terminator is left out). MessageError where the template renders the prompt
    differently before the two replies, or not prefix by prefix; PairDefect too_long over max_length."""
    prompts, replies = [], []
    for side in SIDES:
        prompt_ids, reply_ids = _side_ids(renderer, [*pair.prompt, getattr(pair, side)], pair.tools)
        prompts.append(prompt_ids)
        replies.append(reply_ids)
        if renderer.max_length is not None and len(prompt_ids) + len(reply_ids) > renderer.max_length:
            raise PairDefect("too_long", f"{side}: {len(prompt_ids) + len(reply_ids)} tokens > max_length "
                             f"{renderer.max_length}")
    if prompts[0] != prompts[1]:
        raise MessageError("the chat template renders the prompt differently before the chosen and the rejected "
                           "reply, so one prompt cannot be shared")
    return {"prompt_ids": prompts[0], "chosen_ids": replies[0], "rejected_ids": replies[1]}


def _side_ids(renderer: ChatRenderer, messages: list[dict], tools: list | None) -> tuple[list[int], list[int]]:
    """(the generation prompt, the final reply through its terminator). The prompt is rendered as chat renders it,
    with earlier assistant turns in the template's history form (Qwen3 drops their think blocks), since that is
    what the policy answers at inference; the reply is the renderer's last piece, as SFT supervises it."""
    *_, last = renderer.pieces(messages, tools)
    reply = renderer.assemble([last], [renderer.encode(last[0])])
    end = max(i for i, label in enumerate(reply.labels) if label != IGNORE_INDEX) + 1
    return renderer.prompt_ids(messages[:-1], tools), reply.input_ids[:end]


@dataclass
class PreferenceData:
    """The kept pairs, rendered and split; every rejected row with its reason; the report."""

    train: list[dict]  # rendered pairs (prompt_ids, chosen_ids, rejected_ids)
    test: list[dict]
    heldout: list[dict]  # the held-out pairs as records (Pair.record), in the order of `test`
    examples: list[dict]  # the first training pair's chosen side as rendered, for `sftlab doctor`
    rejected: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Of the rendered pairs and their split: a resume refuses data that renders differently."""
        rendered = json.dumps([self.train, self.test], separators=(",", ":")).encode()
        return hashlib.sha256(rendered).hexdigest()[:16]

    def summary(self) -> str:
        return pair_summary(self.report)


def pair_summary(report: dict) -> str:
    """The data line of a DPO run (printed, and in its report.md)."""
    reasons = ", ".join(f"{k} {v}" for k, v in report["reasons"].items()) or "none"
    total = report["tokens"]["total"]
    tokens = (f"; tokens per pair (prompt and longer reply) p50 {total['p50']}, p99 {total['p99']}, max "
              f"{total['max']}" if total.get("n") else "")
    forms = ", ".join(f"{k} {v}" for k, v in report.get("pair_formats", {}).items())
    repaired = ", ".join(f"{k} {v}" for k, v in report.get("repairs", {}).items())
    return (f"preference data: {report['rows_read']} rows read, {report['kept']} pairs kept ({forms or 'none'}), "
            f"{report['rejected']} rejected ({reasons}){tokens}; {report['pairs']['train']} training pairs, "
            f"{report['pairs']['test']} held out{'; repaired in place: ' + repaired if repaired else ''}")


def prepare_pairs(rows, renderer: ChatRenderer, system_prompt: str | None, test_size: float, split_seed: int,
                  datasets: dict | None = None) -> PreferenceData:
    """Reads every SourceRow of `rows`, keeps the pairs that can teach, renders them and splits them under
    `split_seed`. `datasets`: the per-dataset counts sftlab.data.sources.iter_datasets fills as `rows` are read;
    their weights apply to the training pairs, as in SFT."""
    kept, rejected, reasons, seen, formats, repairs = [], [], Counter(), set(), Counter(), Counter()
    rows_read = 0
    for source_row in rows:
        rows_read += 1
        try:
            pair, rendered = _checked(source_row, renderer, system_prompt, seen, repairs)
        except (FieldError, MessageError, PairDefect) as exc:
            reason = getattr(exc, "reason", "role_order" if isinstance(exc, MessageError) else "malformed_record")
            reasons[reason] += 1
            rejected.append({"source": source_row.source, "line": source_row.line, "reason": reason,
                             "detail": str(exc), "row": source_row.row})
            continue
        formats[pair_format(source_row.row)] += 1
        kept.append((pair, rendered, source_row.source))
    order = list(range(len(kept)))
    random.Random(split_seed).shuffle(order)
    n_test = min(len(kept) - 1, max(1, round(test_size * len(kept)))) if test_size > 0 and len(kept) > 1 else 0
    test_idx, train_idx = sorted(order[:n_test]), sorted(order[n_test:])
    weights = {source: entry["weight"] for entry in (datasets or {}).values() for source in entry["sources"]}
    if any(weight != 1.0 for weight in weights.values()):
        train_idx = weighted(train_idx, [source for *_, source in kept], weights, split_seed)
    lengths = Counter(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for _, r, _ in kept)
    replies = Counter(len(r["chosen_ids"]) for _, r, _ in kept)  # the reply limit of probes and evaluation: chosen's
    report = {"kind": "preference", "rows_read": rows_read, "kept": len(kept), "rejected": len(rejected),
              "reasons": dict(reasons.most_common()), "repairs": dict(sorted(repairs.items())),
              "pair_formats": dict(formats),
              "pairs": {"train": len(train_idx), "test": len(test_idx)},
              "tokens": {"total": length_stats(lengths), "response": length_stats(replies)}}
    examples = [_example(kept[train_idx[0]][0], renderer)] if train_idx else []
    return PreferenceData([kept[i][1] for i in train_idx], [kept[i][1] for i in test_idx],
                          [kept[i][0].record() for i in test_idx], examples, rejected, report)


def _checked(source_row: SourceRow, renderer: ChatRenderer, system_prompt: str | None, seen: set, repairs: Counter
             ) -> tuple[Pair, dict]:
    if source_row.error is not None:
        raise PairDefect(source_row.error_reason or "bad_json", source_row.error)  # the loader's reason
    pair = pair_of(source_row.row, system_prompt, repairs)
    key = pair.key()
    if key in seen:
        raise PairDefect("duplicate_pair", "the same prompt, chosen and rejected as an earlier row")
    rendered = render_pair(renderer, pair)
    seen.add(key)
    return pair, rendered


def _example(pair: Pair, renderer: ChatRenderer) -> dict:
    """The chosen conversation as the renderer renders it for training, in the form `sftlab doctor` checks the
    saved template against (render_check.json)."""
    messages = [*pair.prompt, pair.chosen]
    pieces = renderer.pieces(messages, pair.tools)
    sample = renderer.assemble(pieces, [renderer.encode(text) for text, _ in pieces])
    return {"kind": "preference", "messages": messages, **({"tools": pair.tools} if pair.tools else {}),
            "input_ids": sample.input_ids, "labels": sample.labels, "max_length": None, "overflow": "drop"}
