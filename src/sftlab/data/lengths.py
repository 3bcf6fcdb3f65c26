"""Length distributions in bounded memory: a count per distinct length. Lengths are integers with a few thousand
distinct values however many rows there are, so the counts are small, exact (the same percentiles, mean and
max_length table as from every row's length) and mergeable: shards and workers add theirs up."""

from collections import Counter

import numpy as np

PERCENTILES = (50, 90, 95, 99)
CANDIDATE_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Lengths:
    """(prompt, response) lengths of rendered rows: counts of each prompt, response and total length, and the
    supervised (response) length summed per total, for the max_length table."""

    def __init__(self):
        self.prompt, self.response, self.total, self.supervised_by_total = Counter(), Counter(), Counter(), Counter()

    def add(self, prompt: int, response: int) -> None:
        self.prompt[prompt] += 1
        self.response[response] += 1
        self.total[prompt + response] += 1
        self.supervised_by_total[prompt + response] += response

    def __len__(self) -> int:
        return self.total.total()

    def to_state(self) -> dict:
        return {name: sorted(getattr(self, name).items()) for name in vars(self)}

    @classmethod
    def from_state(cls, state: dict) -> "Lengths":
        lengths = cls()
        for name, items in state.items():
            getattr(lengths, name).update(dict(items))
        return lengths

    def stats(self) -> dict:
        return {"prompt": length_stats(self.prompt), "response": length_stats(self.response),
                "total": length_stats(self.total)}


def length_stats(counts: Counter) -> dict:
    """n, mean, percentiles and max of the lengths counted in `counts` ({length: rows}), exactly as numpy gives
    them for the list of every row's length (np.percentile, method "lower")."""
    n = counts.total()
    if not n:
        return {"n": 0}
    values = np.array(sorted(counts), dtype=np.int64)
    ends = np.cumsum([counts[v] for v in values])  # rows up to and including each value
    quantiles = np.asarray(PERCENTILES, dtype=np.float64) / 100
    # numpy's virtual index for "lower" (alpha = beta = 1), computed as numpy computes it, floored
    index = np.floor(n * quantiles + (1 + quantiles * (1 - 1 - 1)) - 1).astype(np.int64)
    at = values[np.searchsorted(ends, index, side="right")]
    stats = {f"p{p}": int(v) for p, v in zip(PERCENTILES, at)}
    mean = float(sum(int(v) * counts[v] for v in values)) / n
    return {"n": n, "mean": round(mean, 1), **stats, "max": int(values[-1])}


def max_length_suggestion(lengths: Lengths) -> list[dict]:
    """For each candidate max_length: the share of samples, and of supervised tokens, that would be lost."""
    n = len(lengths)
    if not n:
        return []
    all_supervised, longest = sum(lengths.supervised_by_total.values()), max(lengths.total)
    rows = []
    for candidate in CANDIDATE_LENGTHS:
        over = [total for total in lengths.total if total > candidate]
        lost, supervised = sum(lengths.total[t] for t in over), sum(lengths.supervised_by_total[t] for t in over)
        rows.append({"max_length": candidate, "samples_lost": round(lost / n, 4),
                     "supervised_tokens_lost": round(supervised / max(all_supervised, 1), 4)})
        if candidate >= longest:
            break
    return rows
