"""`sdpa_varlen`: PyTorch's scaled_dot_product_attention over each sample of a padding-free row.

Why our own: transformers has no varlen path for sdpa or eager. For a padding-free row (samples concatenated,
position_ids restarting at 0) it builds a block-diagonal mask over the whole row, so attention costs the square
of the row's length (8,192 tokens: 67M scores per head) instead of the sum of the squares of its samples; on
CPU that made padding-free 4x slower than padded batches. FlashAttention's varlen kernel needs CUDA, and
FlexAttention has no backward on CPU (torch 2.13: "FlexAttention does not support backward on CPU").

With `cu_seq_lens_q` (TRL's padding-free collator passes it) each sample's queries attend causally to its own
keys only, one sdpa call per sample: exact, and the cost of the samples alone. Every other call (padded
batches, generation with a KV cache) is transformers' own sdpa, with its own mask.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_SDPA = "sdpa_varlen"


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                        **kwargs):
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu_seq_lens_q.tolist()
    gqa = query.shape[1] != key.shape[1]
    dropout = dropout if module.training else 0.0
    outputs = [
        F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                       dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def sdpa_varlen_mask(*args, attention_mask=None, **kwargs):
    """No mask for a padding-free row (no padding mask given: the attention separates the samples itself),
    transformers' sdpa mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN_SDPA, sdpa_varlen_forward)
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_varlen_mask)
