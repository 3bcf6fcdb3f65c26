import hashlib

import torch

from sftlab.model.tiny import GLM4_SPECIAL_TOKENS, build_tiny_model


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_model_is_built_byte_for_byte_the_same(tmp_path, tiny_model_dir):
    build_tiny_model(tmp_path)
    assert digest(tmp_path) == digest(tiny_model_dir)


def test_tiny_model_has_glm4_architecture(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "GlmForCausalLM"
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.o_proj.bias is None
    assert attn.k_proj.out_features * 2 == attn.q_proj.out_features  # grouped-query: 2 kv heads of 4
    assert mlp.gate_up_proj.out_features == 2 * mlp.down_proj.in_features  # fused gate and up
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tokenizer_carries_glm4_special_tokens_in_order_and_its_template(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(GLM4_SPECIAL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + 10))  # contiguous, after the ordinary vocabulary, like GLM-4
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.chat_template.startswith("[gMASK]<sop>{% for item in messages %}")
    # like GLM-4's tokenizer, plain encoding prefixes [gMASK]<sop> (the tutorial's doubled prefix came from this)
    assert tokenizer.convert_ids_to_tokens(tokenizer("hi")["input_ids"][:2]) == ["[gMASK]", "<sop>"]
