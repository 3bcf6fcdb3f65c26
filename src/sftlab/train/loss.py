"""The LM head and the loss on supervised positions only, in chunks: full-vocabulary logits are never built.

TRL 1.16's SFTTrainer already replaces the model's forward with a fused, chunked head (`add_fused_lm_head`,
its `ChunkedLogProbFunction`: logits tile by tile, gradient folded in place, Triton on GPU). It scores only
supervised positions where Triton runs (CUDA, XPU) and every position elsewhere, padding and prompt included.
This module applies the same kernel to the supervised positions on every device, so on CPU (and any device
without Triton) prompt and padding tokens cost nothing in the head either.

Why not Liger's fused linear cross-entropy: TRL 1.16 refuses it (it replaces the forward that TRL patches),
and TRL's kernel is the same technique for any model_type, "glm" included, for which Liger has no patch.
"""

import functools
import types

import torch

from sftlab.internals import chunked_logprob

ChunkedLogProbFunction, FusedCausalLMOutput = chunked_logprob()

VOCAB_CHUNK = 32768  # vocabulary columns per tile, as TRL
METRIC_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer.compute_loss logs


def supports_supervised_head(model) -> bool:
    """A plain causal LM: a backbone, then a linear head with no logit scaling or soft-capping."""
    config = model.config.get_text_config()
    scaled = any(getattr(config, name, None) is not None for name in
                 ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling"))
    return not scaled and model.get_output_embeddings() is not None and hasattr(model, "base_model")


def add_supervised_lm_head(model) -> bool:
    """Patches `model.forward` so that `fused_lm_head=True` calls score only supervised positions.

    Other calls (generation, evaluation with logits) go to the forward the model had. Returns False, and
    changes nothing, for a model this does not cover (TRL's own fused head then stays in place)."""
    if not supports_supervised_head(model):
        return False
    previous_forward = model.forward

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return previous_forward(*args, **kwargs, **extra)
        head = self.get_output_embeddings()
        if sharded(head.weight):  # FSDP2 or ZeRO-3: TRL's head knows how to gather it
            return previous_forward(*args, fused_lm_head=True, labels=labels, num_items_in_batch=num_items_in_batch,
                                    **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        return supervised_loss(hidden, labels[:, 1:], head, num_items_in_batch)

    model.forward = types.MethodType(forward, model)
    return True


def sharded(weight) -> bool:
    return type(weight).__name__ == "DTensor" or hasattr(weight, "ds_id")


def supervised_loss(hidden: torch.Tensor, next_labels: torch.Tensor, head, num_items_in_batch=None):
    """Mean negative log-likelihood of the supervised next tokens (`next_labels` != -100), divided by
    `num_items_in_batch` when given (the supervised tokens of the whole optimizer step, as TRL and the
    Trainer count them), plus TRL's per-token metrics, zero on other positions."""
    next_labels = next_labels.to(hidden.device)
    mask = next_labels != -100
    log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
        hidden[mask], head.weight, head.bias, next_labels[mask], 1.0, VOCAB_CHUNK, None, 1.0, METRIC_OUTPUTS,
    )
    # masked_scatter keeps the result connected to the graph even when no position is supervised
    log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x)
                                   for x in (log_probs, entropy, is_top1))
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / denominator, log_probs=log_probs, entropy=entropy,
                               is_top1=is_top1, label_mask=mask)
