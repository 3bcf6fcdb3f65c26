"""The quantities train and estimate derive from one config (train/config.py)."""

from types import SimpleNamespace

from sftlab.train.config import batch_setup


def args(**overrides):
    values = dict(world_size=1, process_index=0, gradient_accumulation_steps=1, per_device_train_batch_size=2,
                  max_tokens_per_batch=None, seed=0)
    return SimpleNamespace(**{**values, **overrides})


def test_fixed_size_batches_divide_among_processes_once():
    """10 samples, 2 per micro-batch: 5 micro-batches of 2 samples, shared by 2 processes (estimate once divided
    by the world size twice: micro-batches of 4 samples, then 1 per process)."""
    lengths = [8] * 10
    sampler, batches, plan = batch_setup(args(), lengths, padding_free=False)
    assert sampler is None and [len(b) for b in batches] == [2] * 5
    assert (plan.micro_batches_per_epoch, plan.optimizer_steps_per_epoch) == (5, 5)
    _, batches, plan = batch_setup(args(world_size=2), lengths, padding_free=False)
    assert [len(b) for b in batches] == [2] * 5 and plan.micro_batches_per_epoch == 2


def test_token_budget_batches_come_from_the_sampler_of_this_process():
    lengths = [10, 20, 30, 40, 50, 60, 70, 80]
    sampler, batches, plan = batch_setup(args(max_tokens_per_batch=100, world_size=2, process_index=1), lengths,
                                         padding_free=True)
    assert sampler.shard == 1 and sampler.num_shards == 2
    assert sorted(i for b in batches for i in b) == list(range(8)) and len(batches) % 2 == 0
    assert plan.micro_batches_per_epoch == len(batches) // 2 == len(sampler)
