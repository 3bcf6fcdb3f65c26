"""`sftlab estimate`: the activation arithmetic against the bytes autograd really keeps on the tiny model, and
the command's report on the demo config."""


import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from helpers import REPO
from sftlab.train.config import parse_args
from sftlab.train.estimate import activation_elements_per_token, estimate, model_shapes
from sftlab.train.loss import add_supervised_lm_head

TOLERANCE = 0.25  # the arithmetic is within 25% of the measured bytes


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for the backward pass during a forward."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in params:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch, use_cache=False, fused_lm_head=True)
    return sum(saved.values())


def test_activation_arithmetic_matches_what_autograd_keeps(tiny_model_dir):
    ids = torch.randint(0, 900, (8, 256), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    measured = {}
    for checkpointing in (False, True):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        add_supervised_lm_head(base)
        model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.1))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        measured[checkpointing] = saved_activation_bytes(model, batch)
    shapes = model_shapes(base.config)
    positions, fp32 = ids.numel(), 4
    full = activation_elements_per_token(shapes, 3, 8, checkpointing=False) * positions * fp32
    assert abs(full - measured[False]) / measured[False] < TOLERANCE
    # with checkpointing the forward keeps each layer's input (+ the final norm's); the estimate adds one layer's
    # full set, held while that layer is recomputed in the backward pass
    kept = (shapes.layers + 2) * shapes.hidden * positions * fp32
    assert abs(kept - measured[True]) / measured[True] < 0.1
    checkpointed = activation_elements_per_token(shapes, 3, 8, checkpointing=True) * positions * fp32
    assert checkpointed == kept + (full - 2 * shapes.hidden * positions * fp32) / shapes.layers


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
def test_estimate_reports_tokens_steps_memory_and_a_probed_time(tmp_path):
    args = parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(tmp_path / "run"),
                       "--report_to", "none", "--num_train_epochs", "2"])
    result = estimate(*args)
    text = result.text()
    assert "3,738 per epoch x 2 epochs = 7,476" in text
    assert "padding-free, 8 micro-batches per process per epoch" in text
    assert "optimizer steps                    16" in text  # 8 micro-batches per epoch, no accumulation
    assert "s per step from a 16-step probe" in text
    assert set(result.memory_gib) == {"weights", "trainable + gradients + AdamW", "activations", "logits"}
    assert not (tmp_path / "run").exists()  # the probe trains elsewhere


def test_a_9b_model_on_cpu_gets_the_arithmetic_only(tmp_path, tiny_model_dir):
    """GLM-4-9B's published config (with the tiny tokenizer, so no weights are needed): the memory arithmetic
    for the 9B shapes, and no probe on a CPU."""
    import json
    import re
    import shutil

    from transformers import GlmConfig

    model_dir = tmp_path / "glm-4-9b-shapes"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    GlmConfig(vocab_size=151552, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
              head_dim=128, intermediate_size=13696, attention_bias=True, partial_rotary_factor=0.5,
              tie_word_embeddings=False).save_pretrained(model_dir)
    args = parse_args(["--config", str(REPO / "configs/glm4-9b-lora.yaml"), "--model_name_or_path", str(model_dir),
                       "--data_files", "sftlab:demo", "--bf16", "false", "--bf16_full_eval", "false",
                       "--output_dir", str(tmp_path / "run")])
    result = estimate(*args)
    text = result.text()
    assert "9,399,951,360 (bfloat16), 5,406,720 trainable" in text
    assert abs(result.memory_gib["weights"] - 9_399_951_360 * 2 / 2**30) < 1e-6
    assert "not probed: a model of this size on CPU" in text
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == 151552
    # the recipe's replay and retention at saves, with what they cost (docs/evaluation.md, "Keeping what the model knew")
    rows = int(re.search(r"; (\d+) train, ", text).group(1))
    lines = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in text.splitlines()}
    assert lines["replay"].startswith(f"+{round(0.05 * rows)} training rows (ratio 0.05; up to the replies that "
                                      "stop), from the base's greedy replies to 150 prompts, up to 192 new tokens "
                                      "each: 28,800 generated tokens")
    steps = int(lines["optimizer steps"].replace(",", ""))
    saves = steps // -(-steps // 10)  # save_steps 0.1: every ceil(steps / 10) steps
    assert lines["retention at saves"].startswith(f"{saves} saves x (60 probes, up to 48 greedy new tokens each")
    assert re.fullmatch(r"\d+ optimizer steps, ~[\d,]+ tokens seen \(num_train_epochs 3\) = 3\.0 "
                     rf"epochs of {rows} training rows", lines["budget"]), lines["budget"]
