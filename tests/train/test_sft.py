"""Training on the tiny GLM-4: exact files, which weights change, resume, config errors, the 9B LoRA size."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import REPO
from sftlab.errors import UserError
from sftlab.train.config import parse_args
from sftlab.train.sft import train


def args_for(out, *extra):
    return parse_args([
        "--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(out), "--report_to", "none",
        "--max_steps", "6", "--save_steps", "3", "--eval_strategy", "no", "--logging_steps", "1",
        "--probe_max_new_tokens", "4", *extra,
    ])


def test_lora_run_writes_exactly_these_files_and_changes_only_the_adapter(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    train(*args_for(out))
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "checkpoint-3", "checkpoint-6",
        "data_report.json", "eval", "generation_config.json", "heldout.jsonl", "loss_curves.png", "manifest.json",
        "predictions.jsonl", "rejected.jsonl", "render_check.json", "report.md", "sftlab_config.yaml",
        "tokenizer.json", "tokenizer_config.json", "trainer_log.jsonl", "trainer_state.json",
    ]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["report.md", "results.json", "retention.jsonl",
                                                              "samples.jsonl"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # resolvable without sftlab
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("[gMASK]<sop>")
    stop = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert len(stop) == 3
    # LoRA B starts at zero: every B changed, so every adapter took gradient steps
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 6 and all(v.abs().sum() > 0 for v in lora_b.values())
    # predictions: one line per probe at each of the 2 saves, plus the final probes
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 * 3
    logged_steps = [json.loads(line)["step"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert logged_steps == [1, 2, 3, 4, 5, 6, 6]  # one record per step, then the run summary


def test_lora_training_leaves_base_weights_unchanged(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(*args_for(out, "--lora_modules_to_save", "none"))  # no full lm_head copy: base stays untouched
    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in tuned.state_dict().items() if "lora_" not in k}
    assert set(state) == set(base)
    assert all(torch.equal(state[k], base[k]) for k in base)
    lora = {k: v for k, v in tuned.state_dict().items() if "lora_B" in k}
    assert lora and all(v.abs().sum() > 0 for v in lora.values())


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.slow  # measured over 3.5 s (pytest --durations): out of the quick loop
def test_resume_after_a_crash_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    import sftlab.train.sft as sft

    straight = tmp_path / "straight"
    train(*args_for(straight, "--probe_prompts", "hi"))
    crashed = tmp_path / "crashed"
    real_trainer = sft.SftlabTrainer
    monkeypatch.setattr(sft, "SftlabTrainer", lambda **kw: real_trainer(**{**kw, "callbacks": kw["callbacks"] + [CrashAt(4)]}))
    with pytest.raises(KeyboardInterrupt):
        train(*args_for(crashed, "--probe_prompts", "hi"))
    assert not (crashed / "adapter_config.json").exists()  # a crashed run does not look complete
    with pytest.raises(UserError, match="already holds a run: pass --resume"):
        train(*args_for(crashed, "--probe_prompts", "hi"))
    monkeypatch.setattr(sft, "SftlabTrainer", real_trainer)
    train(*args_for(crashed, "--probe_prompts", "hi", "--resume"))
    state = json.loads((crashed / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    logged = [json.loads(line)["step"] for line in (crashed / "trainer_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6, 6]  # step 4, logged before the crash, is not logged twice
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(crashed / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the resumed run ends where the straight one did


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="--resume: no committed checkpoint in .*; run without --resume"):
        train(*args_for(tmp_path / "empty", "--resume"))


def test_unknown_config_key_in_yaml_is_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: sftlab:tiny-glm4\nbf16: false\nlearning_rat: 0.1\n")
    with pytest.raises(UserError, match="unknown config key\\(s\\): learning_rat"):
        parse_args(["--config", str(config)])


def test_unknown_cli_flag_is_named():
    with pytest.raises(UserError, match="unknown argument\\(s\\): --lora_rank"):
        parse_args(["--lora_rank", "8"])


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(UserError, match="data file nope.json does not exist"):
        train(*args_for(tmp_path / "run", "--data_files", "nope.json"))


def test_glm4_9b_lora_config_gives_the_tutorials_trainable_parameter_count():
    """configs/glm4-9b-lora.yaml on the real GLM-4-9B shapes, on the meta device (no memory, no weights)."""
    from peft import get_peft_model
    from transformers import GlmConfig, GlmForCausalLM

    from sftlab.train.config import lora_config

    cpu = ["--bf16", "false", "--bf16_full_eval", "false"]  # the YAML asks for bf16, which needs a GPU
    model_args, _, _, train_args = parse_args(["--config", str(REPO / "configs/glm4-9b-lora.yaml"), *cpu])
    assert (train_args.max_length, train_args.learning_rate, train_args.num_train_epochs) == (512, 5e-4, 3)
    config = GlmConfig(vocab_size=151552, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                       num_key_value_heads=2, head_dim=128, intermediate_size=13696, attention_bias=True,
                       partial_rotary_factor=0.5, tie_word_embeddings=False)
    with torch.device("meta"):
        model = get_peft_model(GlmForCausalLM(config), lora_config(model_args))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 40 * 8 * ((4096 + 4096) + 2 * (4096 + 256)) == 5_406_720
    targets = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert targets == {"q_proj", "k_proj", "v_proj"}


def one_sgd_step(out, *extra):
    """One optimizer step of plain SGD at lr 1, so the adapter moves by exactly minus its gradient."""
    train(*args_for(out, "--max_steps", "1", "--optim", "sgd", "--learning_rate", "1.0", "--max_grad_norm", "0",
                    "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--final_eval_samples", "0",
                    "--probe_prompts", "hi", *extra))
    return load_file(out / "adapter_model.safetensors")


def assert_same_step(a, b, tolerance=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=tolerance, rtol=0), key


def test_gradient_accumulation_over_token_budget_micro_batches_equals_one_big_batch(tmp_path, capsys):
    """All 168 training samples in one step: one micro-batch, or two accumulated. The loss is the mean over
    the supervised tokens of the whole step (TRL's definition), so the update is the same."""
    whole = one_sgd_step(tmp_path / "whole", "--max_tokens_per_batch", "20000")
    assert "1 micro-batches per process per epoch" in capsys.readouterr().out
    accumulated = one_sgd_step(tmp_path / "accumulated", "--max_tokens_per_batch", "2000",
                               "--gradient_accumulation_steps", "2")
    assert "2 micro-batches per process per epoch, 1 optimizer steps" in capsys.readouterr().out
    assert_same_step(whole, accumulated)


@pytest.mark.slow  # measured over 3.5 s (pytest --durations): out of the quick loop
def test_padding_free_training_step_equals_the_padded_one(tmp_path, capsys):
    """All 168 samples in one micro-batch: padded (sdpa), one row with sdpa_varlen (the CPU default), and
    one row with sdpa's block-diagonal mask give the same update."""
    padded = one_sgd_step(tmp_path / "padded", "--max_tokens_per_batch", "20000", "--padding_free", "false")
    assert "padding 0.0%" not in capsys.readouterr().out
    varlen = one_sgd_step(tmp_path / "varlen", "--max_tokens_per_batch", "20000")
    assert "padding 0.0% of positions" in capsys.readouterr().out
    masked = one_sgd_step(tmp_path / "masked", "--max_tokens_per_batch", "20000", "--padding_free", "true",
                          "--attn_implementation", "sdpa")
    assert "padding-free: on with sdpa attention: exact" in capsys.readouterr().out
    assert_same_step(padded, varlen)
    assert_same_step(padded, masked)


def test_supervised_head_training_step_equals_trls_head(tmp_path):
    ours = one_sgd_step(tmp_path / "ours", "--max_tokens_per_batch", "20000")
    trls = one_sgd_step(tmp_path / "trl", "--max_tokens_per_batch", "20000", "--supervised_head", "false")
    assert_same_step(ours, trls)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error")
def test_qlora_without_a_gpu_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="load_in_4bit: QLoRA needs a CUDA GPU"):
        train(*args_for(tmp_path / "run", "--load_in_4bit", "true"))
    assert not (tmp_path / "run").exists()
    model_args, _, _, _ = parse_args(["--config", str(REPO / "configs/glm4-9b-qlora.yaml"), "--bf16", "false",
                                      "--bf16_full_eval", "false"])
    assert model_args.load_in_4bit and model_args.lora_r == 8


@pytest.mark.parametrize("given, cuda, expected", [
    ("auto", False, 2048), ("auto", True, 8192), ("4096", False, 4096), (4096, True, 4096), ("null", False, None),
    (None, True, None),
])
def test_the_token_budget_auto_is_sized_for_the_device(monkeypatch, given, cuda, expected):
    """auto: 8192 tokens per micro-batch on a GPU; 2048 on CPU, whose caches hold a 2k-token micro-batch's
    activations (benchmarks/train_throughput.py: 1.2x the speed of 8192 on SmolLM2-135M)."""
    from sftlab.train.config import token_budget

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert token_budget(given) == expected
