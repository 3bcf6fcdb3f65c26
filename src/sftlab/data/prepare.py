"""Data files -> rendered train and held-out samples, with every rejected row counted by reason."""

import random
from collections import Counter
from dataclasses import dataclass, field

from sftlab.chat_format import ChatRenderer, MessageError, SampleTooLong
from sftlab.data.convert import FieldError, alpaca_to_messages
from sftlab.data.load import read_rows, resolve_data_file


@dataclass
class Rejected:
    source: str
    line: int
    reason: str  # malformed | too_long
    detail: str


@dataclass
class PreparedData:
    train: list[dict]  # {"input_ids": [...], "labels": [...]}
    test: list[dict]
    test_messages: list[list[dict]]  # the held-out conversations, for evaluation
    rows_read: int
    rejected: list[Rejected] = field(default_factory=list)

    def reasons(self) -> Counter:
        return Counter(r.reason for r in self.rejected)

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons().items())) or "none"
        return (f"data: {self.rows_read} rows read, {len(self.train)} train, {len(self.test)} held out, "
                f"{len(self.rejected)} rejected ({reasons})")


def split_indices(n: int, test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split, identical in every process (the tutorial's was unseeded, so test rows leaked)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = 0 if test_size == 0 or n < 2 else max(1, round(n * test_size))
    return sorted(order[n_test:]), sorted(order[:n_test])


def prepare_data(data_files: list[str], renderer: ChatRenderer, test_size: float, split_seed: int,
                 system_prompt: str | None = None) -> PreparedData:
    conversations, rejected, rows_read = [], [], 0
    for name in data_files:
        for source_row in read_rows(resolve_data_file(name)):
            rows_read += 1
            if source_row.error:
                rejected.append(Rejected(source_row.source, source_row.line, "malformed", source_row.error))
                continue
            try:
                conversations.append((source_row, alpaca_to_messages(source_row.row, system_prompt)))
            except FieldError as exc:
                rejected.append(Rejected(source_row.source, source_row.line, "malformed", str(exc)))
    train_idx, test_idx = split_indices(len(conversations), test_size, split_seed)
    data = PreparedData([], [], [], rows_read, rejected)
    for indices, samples, is_test in ((train_idx, data.train, False), (test_idx, data.test, True)):
        for i in indices:
            source_row, messages = conversations[i]
            try:
                sample = renderer.render(messages)
            except MessageError as exc:
                rejected.append(Rejected(source_row.source, source_row.line, "malformed", str(exc)))
                continue
            except SampleTooLong as exc:
                rejected.append(Rejected(source_row.source, source_row.line, "too_long", str(exc)))
                continue
            samples.append({"input_ids": sample.input_ids, "labels": sample.labels})
            if is_test:
                data.test_messages.append(messages)
    return data
