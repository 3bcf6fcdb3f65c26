"""Full fine-tuning (use_peft: false) on the tiny GLM-4: the run folder is a whole model that chat, eval and
the doctor load, written so that only config.json's arrival marks it complete, and every weight trained."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO
from sftlab import cli
from sftlab.eval.doctor import run_checks
from sftlab.train.config import parse_args
from sftlab.train.sft import train


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
def test_full_fine_tuning_writes_a_whole_model_that_every_verb_loads(tmp_path, tiny_model_dir, monkeypatch, capsys):
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moved.append(Path(dst).name), real_replace(src, dst))[1])
    out = tmp_path / "full"
    train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--use_peft", "false", "--output_dir", str(out),
                       "--report_to", "none", "--max_steps", "3", "--save_steps", "3", "--eval_strategy", "no",
                       "--learning_rate", "1e-3", "--final_eval_samples", "4"]))
    monkeypatch.undo()
    final = [name for name in moved if name in ("config.json", "model.safetensors", "generation_config.json",
                                               "tokenizer.json", "tokenizer_config.json")]
    assert final[-1] == "config.json" and set(final) == {"config.json", "model.safetensors", "generation_config.json",
                                                          "tokenizer.json", "tokenizer_config.json"}
    assert not (out / "adapter_config.json").exists()
    assert len(json.loads((out / "generation_config.json").read_text())["eos_token_id"]) == 3  # GLM-4's stop ids
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())

    base, tuned = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == tuned.keys()
    unchanged = [name for name in base if torch.equal(base[name], tuned[name])]
    assert unchanged == []  # every weight tensor took gradient steps

    capsys.readouterr()
    assert cli.main(["chat", "--model", str(out), "--prompt", "你是谁？", "--temperature", "0", "--json",
                     "--max_new_tokens", "4"]) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(reply) == {"reply", "finish_reason", "new_tokens"} and reply["new_tokens"] <= 4
    assert cli.main(["eval", "--model", str(out), "--max_new_tokens", "4"]) == 0
    assert json.loads((out / "eval" / "results.json").read_text())["tuned"]["n"] == 9
    checks = {c.name: c.status for c in run_checks(str(out), None, max_new_tokens=4)}
    assert checks["chat template renders training samples as training did"] == "pass"
    assert checks["terminator tokens are supervised"] == "pass"
    assert checks["generation config stops on all stop tokens"] == "pass"
