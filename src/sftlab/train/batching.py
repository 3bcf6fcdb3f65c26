"""Micro-batches by token budget, and the padding-free decision.

A fixed number of samples per micro-batch (the tutorial's 2) pads every batch to its longest sample and, on
short Alpaca-style data, runs many tiny steps. Here samples are grouped by length so that each micro-batch
holds about `max_tokens_per_batch` tokens with little padding; the groups are then shuffled under the seed,
so training is not ordered by length.
"""

import math
import random
from dataclasses import dataclass
from importlib.util import find_spec

from transformers import TrainerCallback

from sftlab.internals import batch_sampler_base
from sftlab.model.attention import VARLEN_SDPA


def batch_cost(lengths: list[int], padding_free: bool) -> int:
    """Tokens a micro-batch occupies: real tokens when packed into one row, else padded to its longest."""
    return sum(lengths) if padding_free else len(lengths) * max(lengths)


def token_budget_batches(lengths: list[int], max_tokens: int, padding_free: bool, seed: int,
                         num_shards: int = 1, cuts: list[int] | None = None) -> list[list[int]]:
    """One epoch's micro-batches (lists of sample indices), in training order.

    Sorted by length (ties broken at random under `seed`), cut greedily at `max_tokens`, shuffled under
    `seed`. A sample longer than the budget gets a micro-batch of its own. The count is padded to a
    multiple of `num_shards` by splitting the largest micro-batches (no sample is repeated), so every
    process gets the same number of micro-batches. The count depends only on the lengths, never on the
    seed, so every epoch has the same number of steps; `cuts` (from even_cuts) can be computed once."""
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    if cuts is None:
        cuts = even_cuts(sorted(lengths), max_tokens, padding_free, num_shards)
    batches = [order[start:end] for start, end in zip([0] + cuts, cuts + [len(order)])]
    while len(batches) % num_shards and any(len(b) > 1 for b in batches):
        largest = max(range(len(batches)), key=lambda b: (len(batches[b]) > 1, len(batches[b]), -b))
        batch = batches.pop(largest)
        batches[largest:largest] = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
    rng.shuffle(batches)
    if len(batches) % num_shards:  # fewer samples than processes: the only case where one repeats
        batches += batches[: num_shards - len(batches) % num_shards]
    return batches


def even_cuts(sorted_lengths: list[int], max_tokens: int, padding_free: bool, num_shards: int) -> list[int]:
    """Where to cut the length-sorted samples: as many micro-batches as the greedy cut at `max_tokens` makes
    (rounded up to a multiple of `num_shards`), but with the tokens spread evenly, since the greedy cut leaves a
    small remnant at the end. The smallest budget that needs no more micro-batches, by binary search (the count
    only falls as the budget grows). Depends on the lengths alone, never on the seed."""
    count = len(greedy_cuts(sorted_lengths, max_tokens, padding_free)) + 1
    count = -(-count // num_shards) * num_shards  # every process gets the same number
    low, high = 1, max_tokens
    while low < high:
        middle = (low + high) // 2
        if len(greedy_cuts(sorted_lengths, middle, padding_free)) + 1 <= count:
            high = middle
        else:
            low = middle + 1
    return greedy_cuts(sorted_lengths, low, padding_free)


def greedy_cuts(sorted_lengths: list[int], max_tokens: int, padding_free: bool) -> list[int]:
    """Where to cut a length-sorted list so that each piece costs at most max_tokens (one sample may
    exceed it alone)."""
    cuts, start, total = [], 0, 0
    for i, length in enumerate(sorted_lengths):
        # sorted ascending, so the newest sample is the longest: the padded cost is count x its length
        cost = total + length if padding_free else (i - start + 1) * length
        if i > start and cost > max_tokens:
            cuts.append(i)
            start, cost = i, length
        total = cost
    return cuts


class TokenBudgetSampler(batch_sampler_base()):
    """Yields this process's micro-batches of one epoch: every `num_shards`-th of token_budget_batches.

    It subclasses transformers' BatchRebalanceSampler (internals.py) only for how the Trainer treats that class:
    passed as the DataLoader's batch_sampler and not re-sharded by accelerate (it is already rank-aware)."""

    def __init__(self, lengths: list[int], max_tokens: int, padding_free: bool, seed: int,
                 num_shards: int = 1, shard: int = 0):
        self.lengths, self.max_tokens, self.padding_free = list(lengths), max_tokens, padding_free
        self.seed, self.num_shards, self.shard = seed, num_shards, shard
        self.epoch = 0
        self.cuts = even_cuts(sorted(self.lengths), max_tokens, padding_free, num_shards)  # the same every epoch
        self._last = None  # (epoch, its micro-batches): the plan, len() and the first epoch share one computation
        self._num_batches = len(self.epoch_batches(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All processes' micro-batches of `epoch`; process p trains batches p, p + n, p + 2n, ..."""
        if self._last is None or self._last[0] != epoch:
            batches = token_budget_batches(self.lengths, self.max_tokens, self.padding_free,
                                           self.seed * 1_000_003 + epoch, self.num_shards, self.cuts)
            self._last = (epoch, batches)
        return self._last[1]

    def __iter__(self):
        yield from self.epoch_batches(self.epoch)[self.shard::self.num_shards]

    def __len__(self) -> int:
        return self._num_batches // self.num_shards


@dataclass
class BatchPlan:
    """What the optimizer sees per step, for the console, the manifest and the run report."""

    micro_batches_per_epoch: int  # per process
    optimizer_steps_per_epoch: int
    samples_per_step: float  # mean over the epoch, all processes and accumulation steps together
    tokens_per_step: float  # real (non-padding) tokens
    padding_share: float  # padded positions / all positions computed

    def summary(self) -> str:
        return (f"{self.micro_batches_per_epoch} micro-batches per process per epoch, "
                f"{self.optimizer_steps_per_epoch} optimizer steps; per step {self.samples_per_step:.1f} samples, "
                f"{self.tokens_per_step:,.0f} tokens; padding {self.padding_share:.1%} of positions")


def batch_plan(batches: list[list[int]], lengths: list[int], padding_free: bool, num_shards: int,
               grad_accum: int) -> BatchPlan:
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(batch_cost([lengths[i] for i in b], padding_free) for b in batches)
    per_process = len(batches) // num_shards
    steps = max(1, math.ceil(per_process / grad_accum))
    return BatchPlan(per_process, steps, sum(map(len, batches)) / steps, real / steps, 1 - real / computed)


def fixed_size_batches(num_samples: int, batch_size: int, seed: int) -> list[list[int]]:
    """The tutorial's batching (random order, `batch_size` samples), for comparing plans."""
    order = list(range(num_samples))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, num_samples, batch_size)]


class SamplerEpochCallback(TrainerCallback):
    """Tells the sampler which epoch begins. The Trainer's own set_epoch does not reach a batch sampler
    after it skipped the trained batches of a resumed epoch, and the order must not depend on that."""

    def __init__(self, sampler: TokenBudgetSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(math.floor(state.epoch or 0))


def training_attention(requested: str | None, padding_free: bool | None, dtype: str = "bfloat16") -> str | None:
    """The attention kernel to train with: as requested; else FlashAttention-2 on a CUDA GPU where flash_attn
    is installed and the weights are 16-bit (its only dtypes); else sftlab's `sdpa_varlen` (sdpa per sample of
    a padding-free row), unless padding-free is turned off, where transformers' default (sdpa) stays."""
    if requested is not None:
        return requested
    import torch

    if torch.cuda.is_available() and find_spec("flash_attn") and dtype in ("bfloat16", "float16", "auto"):
        return "flash_attention_2"
    return VARLEN_SDPA if padding_free is not False else None


def resolve_padding_free(setting: bool | None, attention: str | None, verbose: bool = True) -> bool:
    """Padding-free where the attention kernel separates the samples of a row by itself (varlen); elsewhere
    only when asked for.

    Without a varlen kernel (sdpa, eager), transformers builds a block-diagonal mask from position_ids: exact,
    but attention then costs the square of the whole row, slower than padded length-grouped batches."""
    varlen = attention == VARLEN_SDPA or "flash" in (attention or "")
    use = varlen if setting is None else setting
    if verbose:
        if use and varlen:
            print(f"padding-free: on ({attention}: each sample of a row attends only to itself)")
        elif use and not varlen:
            print(f"padding-free: on with {attention or 'sdpa'} attention: exact (block-diagonal mask from "
                  f"position_ids), but attention is quadratic in the packed row; {VARLEN_SDPA} or FlashAttention "
                  "is faster")
        elif not use and setting is None:
            print(f"padding-free: off ({attention} attention has no varlen kernel); micro-batches are "
                  "length-grouped instead, which removes most padding")
    return use
