import hashlib
import json

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


V1_WEIGHTS = {  # the sha256 of model.safetensors as the earlier build (v1) wrote it, before GLM-4's pre-tokenizer
    "sftlab:tiny-glm4": "22c719bcf042732078fc9220db3c70731c18a72c08d1357dc909321700bcb083",
    "sftlab:tiny-glm4-0414": "5573f3d8756fcb7348e331b8b8a6ca74affd58d32ca273e9af172c6d2a50ecd2",
}


def test_the_glm4_tokenizers_split_text_as_glm4_does(tokenizer):
    """GLM-4's pre-tokenizer: digits in groups of up to three, a letter run keeps one leading non-letter, newlines
    apart from spaces (GPT-2's pattern, the earlier build's, puts a space before each word and digit run)."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Split", "ByteLevel"]
    splits = [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("ab 12345\n\n  x!")]
    assert splits == ["ab", "Ġ", "123", "45", "ĊĊ", "Ġ", "Ġx", "!"]


def test_a_run_on_the_earlier_build_gets_its_base_back_byte_for_byte(sftlab_home, tmp_path):
    """A run trained on v1 (its tokenizer splits text with GPT-2's pattern) resolves to name@v1, whose weights are
    the earlier build's, byte for byte; a run on the current build resolves to the name alone."""
    from sftlab.model.load import adapter_base
    from sftlab.model.tiny import ensure_tiny_model

    for name, weights in V1_WEIGHTS.items():
        earlier = ensure_tiny_model(f"{name}@v1")
        assert hashlib.sha256((earlier / "model.safetensors").read_bytes()).hexdigest() == weights
        assert earlier.name.endswith("-v1") and ensure_tiny_model(name).name.endswith("-v2")
        for build, expected in ((earlier, f"{name}@v1"), (ensure_tiny_model(name), name)):
            run = tmp_path / build.name
            run.mkdir()
            (run / "sftlab_config.yaml").write_text(f"model:\n  model_name_or_path: {name}\n")
            (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": name}))
            (run / "tokenizer.json").write_bytes((build / "tokenizer.json").read_bytes())
            assert adapter_base(run) == expected
