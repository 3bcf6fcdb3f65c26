"""Every bad argument is one line naming the field and its allowed range, exit 2, before any model is loaded."""

import json
import os
import shutil

import pytest
import torch

from helpers import REPO
from sftlab import cli

TRAIN = ["train", "--config", "configs/demo.yaml", "--output_dir", "{tmp}/run", "--report_to", "none"]
TINY = ["--model", "sftlab:tiny-glm4"]

CASES = [
    (TRAIN + ["--test_size", "0"], "eval_strategy steps needs a held-out split, and there is none (test_size 0.0"),
    (TRAIN + ["--data_files", "{tmp}/one_row.jsonl"], "needs a held-out split, and there is none"),
    (TRAIN + ["--per_device_train_batch_size", "0"], "per_device_train_batch_size: must be an integer >= 1, got 0"),
    (["train", "--config", "{tmp}/lr_list.yaml"], "config file {tmp}/lr_list.yaml:3: learning_rate: [1, 2] is not a "
                                                 "valid float"),
    (TRAIN + ["--num_train_epochs", "nan"], "num_train_epochs: must be a positive number, got nan"),
    (TRAIN + ["--num_train_epochs", "-1"], "num_train_epochs: must be a positive number, got -1.0"),
    (TRAIN + ["--lora_target_modules", "query_key_value"],
     "lora_target_modules: query_key_value matches no module of the model; its linear layers are"),
    (TRAIN + ["--model_name_or_path", "{tmp}/tied"],  # the demo trains lm_head in full
     "lora_modules_to_save: lm_head is tied to the model's other embedding (tie_word_embeddings): training it in "
     "full would put a 0.1M-parameter copy in the adapter and untie the merged model. Leave it out (LoRA on "
     "all-linear adapts the model without it), or train every weight with use_peft false"),
    (TRAIN[:4] + ["{tmp}/a_file"], "output_dir {tmp}/a_file is a file, not a folder"),
    (TRAIN + ["--save_steps", "0"], "save_steps: must be a positive number (< 1: a share of all steps), got 0.0"),
    (TRAIN + ["--max_steps", "-5"], "max_steps: must be -1 (use num_train_epochs) or positive, got -5"),
    (TRAIN + ["--max_tokens_per_batch", "0"], "max_tokens_per_batch: must be an integer >= 1, auto or null, got 0"),
    (TRAIN + ["--max_tokens_per_batch", "lots"], "max_tokens_per_batch: must be an integer >= 1, auto or null, got "
                                                  "'lots'"),
    (TRAIN + ["--learning_rate", "0"], "learning_rate: must be a positive number, got 0.0"),
    (["train", "--config", "{tmp}/list.yaml"], "config file {tmp}/list.yaml: expected a mapping of field: value, got a "
                                                "list"),
    (["train", "--config", "{tmp}/scalar.yaml"], "expected a mapping of field: value, got a str"),
    (TRAIN + ["--lora_alpha", "0"], "lora_alpha: must be a positive number (the update is scaled by alpha / r), got 0"),
    (TRAIN + ["--max_length", "5000"], "max_length 5000 is above the model's context of 4096 tokens "
                                       "(max_position_embeddings): set max_length to 4096 or less"),
    (TRAIN + ["--max_tokens_per_batch", "64"], "max_tokens_per_batch 64 is smaller than the longest training sample ("),
    (TRAIN + ["--output_dir", ""], "output_dir: must name a folder, got an empty string"),
    (["train", "--config", "{tmp}/tab.yaml"], "config file {tmp}/tab.yaml:3:1: not valid YAML: found character '\\t' "
                                              "that cannot start any token (YAML does not allow tabs for indentation"),
    (TRAIN + ["--data_files", "{tmp}"], "data path {tmp} is a folder: pass its files, e.g. {tmp}/*.jsonl"),
    (TRAIN + ["--data_files", "{tmp}/two_rows.jsonl", "--test_size", "0.9"],
     "test_size 0.9 leaves no training samples: all 2 usable rows were held out"),
    (TRAIN + ["--data_files", "{tmp}/utf16.jsonl"], "data file {tmp}/utf16.jsonl is UTF-16 or UTF-32 text, not UTF-8: "
                                                    "convert it, e.g. `iconv -f UTF-16 -t UTF-8"),
    (TRAIN + ["--data_files", "{tmp}/gbk.jsonl"], "data file {tmp}/gbk.jsonl is not UTF-8: no line of it decodes as "
                                                  "UTF-8, and it reads as GBK/GB18030"),
    (["chat", *TINY, "--prompt", "   "], "--prompt is empty"),
    (["chat", *TINY, "--prompt", "hi", "--max_new_tokens", "0"], "max_new_tokens: must be an integer >= 1, got 0"),
    (["chat", *TINY, "--prompt", "hi", "--temperature", "-1"], "temperature: must be a number >= 0 (0 is greedy), got -1.0"),
    (["chat", *TINY, "--prompt", "hi", "--top_p", "2"], "top_p: must be in (0, 1], got 2.0"),
    (["chat", *TINY, "--prompt", "hi", "--repetition_penalty", "0"], "repetition_penalty: must be a positive number, or null, got 0.0"),
    (["chat", *TINY, "--prompt", "你好" * 5000], "it exceeds the model's context of 4096 tokens"),
    (["eval"], "pass --adapter RUN (a LoRA run) or --model PATH"),
    (["eval", *TINY, "--batch_size", "0"], "batch_size: must be an integer >= 1, got 0"),
    (["eval", *TINY, "--max_new_tokens", "0"], "max_new_tokens: must be an integer >= 1, or null, got 0"),
    (["export"], "pass --adapter RUN (a LoRA run, merged first) or --model DIR (a model folder)"),
    (["export", *TINY, "--outtype", "q4_k_m", "--output", "{tmp}/k"], "--outtype q4_k_m needs llama.cpp's "
                                                                       "llama-quantize on PATH"),
    (["export", *TINY, "--llama_cpp", "{tmp}", "--output", "{tmp}/x"], "--llama_cpp {tmp}: no convert_hf_to_gguf.py "
                                                                       "there (give a llama.cpp checkout)"),
    (["export", "--model", "{tmp}/remote"], "{tmp}/remote/config.json names custom code (auto_map), which llama.cpp's "
                                            "converter would run"),
    (["serve", *TINY, "--max_tokens", "0"], "max_tokens: must be an integer >= 1, or null, got 0"),
    (["doctor", *TINY, "--gguf", "{tmp}/none.gguf"], "--gguf {tmp}/none.gguf: no such file"),
]
if not torch.cuda.is_available():
    CASES.append((["chat", *TINY, "--prompt", "hi", "--device", "cuda"], "--device cuda: this machine has no CUDA GPU"))


@pytest.fixture
def inputs(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(REPO)
    (tmp_path / "one_row.jsonl").write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    (tmp_path / "lr_list.yaml").write_text("model_name_or_path: sftlab:tiny-glm4\nbf16: false\nlearning_rate: [1, 2]\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "scalar.yaml").write_text("just a string\n")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.XModel"}}))
    (tmp_path / "tab.yaml").write_text("model_name_or_path: sftlab:tiny-glm4\nlora:\n\tr: 8\n")
    rows = [{"instruction": "你好", "output": "世界和平"}, {"instruction": "再见", "output": "明天见"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "two_rows.jsonl").write_text(text, encoding="utf-8")
    (tmp_path / "utf16.jsonl").write_bytes(text.encode("utf-16"))
    (tmp_path / "gbk.jsonl").write_bytes(text.encode("gbk"))
    tied = tmp_path / "tied"  # the tiny model with tied embeddings, as SmolLM2 and many small models have them
    shutil.copytree(tiny_model_dir, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the argument was checked")

    import sftlab.model.load as load
    import sftlab.train.sft as sft

    monkeypatch.setattr(load, "load_model", no_model)
    monkeypatch.setattr(sft, "load_model", no_model)
    return tmp_path


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:1] + a[-2:])[:40] for a, _ in CASES])
def test_bad_argument_is_one_line_and_exit_2(args, message, inputs, capsys):
    tmp = str(inputs)
    code = cli.main([a.replace("{tmp}", tmp) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sftlab ")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert message.replace("{tmp}", tmp) in lines[0] and "Traceback" not in err
    assert not (inputs / "run" / "sftlab_config.yaml").exists()  # nothing of a run was written


def test_an_adapter_trained_on_another_base_is_one_line(tmp_path, capsys, tiny_model_dir):
    import shutil

    from transformers import GlmConfig, GlmForCausalLM

    from sftlab.train.config import parse_args
    from sftlab.train.sft import train

    run = train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(tmp_path / "run"),
                             "--report_to", "none", "--max_steps", "1", "--eval_strategy", "no",
                             "--final_eval_samples", "0", "--probe_prompts", "hi", "--probe_max_new_tokens", "1"]))
    other = tmp_path / "other-base"
    config = GlmConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.head_dim = 64, 16
    GlmForCausalLM(config).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, other / name)
    capsys.readouterr()
    code = cli.main(["chat", "--adapter", str(run), "--model", str(other), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"adapter {run} does not fit the base model {other} (trained on another base?): size mismatch" in err
    assert os.path.exists(run / "adapter_config.json")


def test_sigint_while_the_model_loads_is_one_line_and_exit_130(inputs, capsys, monkeypatch):
    import sftlab.train.sft as sft

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "load_model", interrupted)
    code = cli.main([a.replace("{tmp}", str(inputs)) for a in TRAIN])
    err = capsys.readouterr().err
    assert code == 130 and err.strip().splitlines()[-1] == ("sftlab train: interrupted (SIGINT): nothing is left "
                                                                 "half-written; run it again")
    assert "Traceback" not in err and not (inputs / "run" / ".sftlab.lock").exists()
