"""Exactness of the fast paths on the tiny GLM-4 in fp32: a padding-free row against the same samples padded,
and the supervised-only chunked head against the model's own full-logits loss (loss and gradients)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import sftlab.model.attention  # noqa: F401  registers sdpa_varlen
from sftlab.train.loss import add_supervised_lm_head

TOLERANCE = 1e-5


def mixed_samples(vocab_size: int) -> list[dict]:
    """A 5-token, a 500-token and a 37-token sample, each with a masked prompt."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for length, prompt in ((5, 2), (500, 120), (37, 10)):
        ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return samples


def base_model(model_dir, attention):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)


def lora_model(model_dir, attention="sdpa"):
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"],
                        init_lora_weights=False)  # random B: every LoRA matrix gets a gradient
    return get_peft_model(base_model(model_dir, attention), config)


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad()
    output = model(**batch, use_cache=False, **kwargs)  # as in training; a cache turns off packed masking
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output.loss.detach(), grads


def assert_close(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a.item() - loss_b.item()) < TOLERANCE
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=TOLERANCE, rtol=0), name
        assert grads_a[name].abs().sum() > 0, name


@pytest.mark.parametrize("attention", ["sdpa", "eager", "sdpa_varlen"])
def test_padding_free_row_equals_the_same_samples_padded(tiny_model_dir, tokenizer, attention):
    model = lora_model(tiny_model_dir, attention)
    samples = mixed_samples(model.config.vocab_size)
    padded = DataCollatorForLanguageModeling(tokenizer.pad_token_id)(samples)
    packed = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)(samples)
    assert packed["input_ids"].shape == (1, 542) and "attention_mask" not in packed
    assert padded["input_ids"].shape == (3, 500)
    assert_close(loss_and_grads(model, padded), loss_and_grads(model, packed))


def test_supervised_chunked_head_equals_the_full_logits_loss_for_lora(tiny_model_dir, tokenizer):
    model = lora_model(tiny_model_dir)
    add_supervised_lm_head(model.get_base_model())
    samples = mixed_samples(model.config.vocab_size)
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=padding_free)(samples)
        plain = loss_and_grads(model, batch)
        chunked = loss_and_grads(model, batch, fused_lm_head=True)
        assert_close(plain, chunked)


def test_supervised_chunked_head_equals_the_full_logits_loss_for_full_fine_tuning(tiny_model_dir, tokenizer):
    model = base_model(tiny_model_dir, "sdpa")
    add_supervised_lm_head(model)
    batch = DataCollatorForLanguageModeling(tokenizer.pad_token_id)(mixed_samples(model.config.vocab_size))
    plain, chunked = loss_and_grads(model, batch), loss_and_grads(model, batch, fused_lm_head=True)
    assert "lm_head.weight" in chunked[1]
    assert_close(plain, chunked)


def test_supervised_head_divides_by_the_tokens_of_the_whole_optimizer_step(tiny_model_dir, tokenizer):
    """Two micro-batches, each divided by the supervised tokens of both (num_items_in_batch, as the Trainer
    passes it under gradient accumulation), sum to the mean loss of one batch holding all the samples."""
    model = lora_model(tiny_model_dir)
    add_supervised_lm_head(model.get_base_model())
    samples = mixed_samples(model.config.vocab_size)
    collate = DataCollatorForLanguageModeling(tokenizer.pad_token_id)
    whole = loss_and_grads(model, collate(samples))
    parts = [collate(samples[:1]), collate(samples[1:])]
    total = sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts)
    model.zero_grad()
    loss = sum(model(**p, use_cache=False, fused_lm_head=True, num_items_in_batch=total).loss for p in parts)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert_close(whole, (loss.detach(), grads))


def test_generation_is_unchanged_by_the_supervised_head_and_sdpa_varlen(tiny_model_dir, tokenizer):
    """Left-padded batched generation (probes, evaluation) through sdpa_varlen and the patched forward gives
    the same tokens as plain sdpa."""
    prompts = tokenizer(["你好", "告诉我1+2等于多少？"], return_tensors="pt", padding=True, padding_side="left")
    replies = []
    for attention in ("sdpa", "sdpa_varlen"):
        model = base_model(tiny_model_dir, attention)
        add_supervised_lm_head(model)
        replies.append(model.generate(**prompts, max_new_tokens=8, do_sample=False))
    assert torch.equal(replies[0], replies[1]) and replies[0].shape == (2, prompts["input_ids"].shape[1] + 8)
