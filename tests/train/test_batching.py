"""Token-budget micro-batches: every sample once per epoch, within budget, the same count in every epoch and
on every process, shuffled under the seed."""

import random

from sftlab.train.batching import TokenBudgetSampler, batch_cost, batch_plan, token_budget_batches


def lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [min(1200, int(rng.lognormvariate(4.8, 0.6)) + 8) for _ in range(n)]


def test_each_sample_once_and_each_micro_batch_within_budget():
    sizes = lengths()
    for padding_free in (False, True):
        batches = token_budget_batches(sizes, 2048, padding_free, seed=1)
        assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
        for b in batches:
            assert len(b) == 1 or batch_cost([sizes[i] for i in b], padding_free) <= 2048


def test_length_grouping_removes_most_padding_and_order_is_not_sorted():
    sizes = lengths()
    batches = token_budget_batches(sizes, 2048, False, seed=1)
    assert batch_plan(batches, sizes, False, 1, 1).padding_share < 0.05
    longest = [max(sizes[i] for i in b) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_same_count_every_epoch_different_order_reproducible_under_the_seed():
    sizes = lengths()
    sampler = TokenBudgetSampler(sizes, 2048, False, seed=3)
    epochs = [sampler.epoch_batches(e) for e in range(3)]
    assert len({len(b) for b in epochs}) == 1 and len(sampler) == len(epochs[0])
    assert epochs[0] != epochs[1]
    assert TokenBudgetSampler(sizes, 2048, False, seed=3).epoch_batches(1) == epochs[1]
    sampler.set_epoch(2)
    assert list(sampler) == epochs[2]


def test_every_process_gets_the_same_number_of_micro_batches_and_no_sample_twice():
    sizes = lengths(n=301)
    for shards in (2, 3, 8):
        parts = [list(TokenBudgetSampler(sizes, 4096, True, seed=0, num_shards=shards, shard=s)) for s in range(shards)]
        assert len({len(p) for p in parts}) == 1
        assert sorted(i for p in parts for b in p for i in b) == list(range(len(sizes)))


def test_a_sample_over_the_budget_gets_a_micro_batch_of_its_own():
    batches = token_budget_batches([10, 10, 5000, 10], 100, False, seed=0)
    assert [2] in batches and sorted(map(len, batches)) == [1, 3]
