"""`sftlab merge`: the merged folder is a plain transformers model (loads without sftlab), its logits equal
base + adapter, it carries the run's template, stop ids and a model card, and the doctor and chat accept it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TRAINED
from sftlab.chat_format import ChatRenderer
from sftlab.errors import UserError
from sftlab.export.merge import merge
from sftlab.model.load import load_for_inference

PLAIN_TRANSFORMERS = """
import json, sys
sys.modules["sftlab"] = None  # sftlab is not importable here
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids, expected = sys.argv[1], json.loads(sys.argv[2]), torch.load(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你是谁？"}], add_generation_prompt=True)
print(json.dumps({"max_diff": (logits - expected).abs().max().item(), "prompt": list(prompt["input_ids"])}))
"""


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run(*TRAINED)


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    return merge(str(run), str(tmp_path_factory.mktemp("merged") / "model"), dtype="float32")


@pytest.mark.slow  # measured over 3.5 s (pytest --durations): out of the quick loop
def test_merged_folder_is_a_plain_transformers_model_equal_to_base_plus_adapter(run, merged, tmp_path):
    assert sorted(p.name for p in merged.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "sftlab_config.yaml",
        "tokenizer.json", "tokenizer_config.json"]
    tuned, tokenizer = load_for_inference(adapter=str(run), device="cpu", dtype="float32")
    ids = ChatRenderer(tokenizer).prompt_ids([{"role": "user", "content": "你是谁？"}])
    with torch.no_grad():
        torch.save(tuned(torch.tensor([ids])).logits, tmp_path / "expected.pt")
    result = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(merged), json.dumps(ids),
                             str(tmp_path / "expected.pt")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["max_diff"] < 1e-5 and out["prompt"] == ids  # same logits, same chat template
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == json.loads(
        (run / "generation_config.json").read_text())["eos_token_id"]
    card = (merged / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n") and "merged" in card


def test_the_doctor_and_chat_accept_the_merged_model(merged, capsys):
    from sftlab.cli import main

    assert main(["doctor", "--model", str(merged), "--max_new_tokens", "32"]) == 0
    assert "0 failed" in capsys.readouterr().out
    assert main(["chat", "--model", str(merged), "--prompt", "你是谁？", "--temperature", "0", "--json",
                 "--max_new_tokens", "32"]) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reply["finish_reason"] == "stop" and reply["reply"]


def test_a_non_finite_tensor_is_refused_by_name(run, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors = load_file(broken / "adapter_model.safetensors")
    name = sorted(n for n in tensors if "lora_B" in n)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"refusing to merge: .* has \d+ non-finite values") as error:
        merge(str(broken), str(tmp_path / "merged"), dtype="float32")
    layer = name.split(".lora_B")[0].replace("base_model.model.", "")
    assert layer in str(error.value)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged-*"))  # nothing half-written


def test_the_run_folder_gets_a_model_card_instead_of_pefts_template(run):
    card = (run / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n- sftlab\n")
    assert "More Information Needed" not in card
    for part in ("## Training", "LoRA r=32, alpha=64", "## Data", "177 rows read", "## Probe replies"):
        assert part in card


def newest_checkpoint(run: Path) -> Path:
    return max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def test_a_checkpoint_merges_with_its_runs_recipe_stop_ids_and_card(run):
    checkpoint = newest_checkpoint(run)
    merged = merge(str(checkpoint), dtype="float32")
    assert merged == run.with_name(f"run-{checkpoint.name}-merged")  # beside the run, not inside it
    assert (merged / "generation_config.json").read_text() == (run / "generation_config.json").read_text()
    assert (merged / "sftlab_config.yaml").read_text() == (run / "sftlab_config.yaml").read_text()
    card = (merged / "README.md").read_text()
    assert f"# run-{checkpoint.name}-merged (merged)" in card
    assert f"Supervised fine-tuning of `sftlab:tiny-glm4` with sftlab (TRL + PEFT) ({checkpoint.name} of the run run)" \
        in card
    assert "- method: LoRA r=32" in card and "full fine-tuning" not in card
    assert f'from_pretrained("run-{checkpoint.name}-merged")' in card
    assert "## Evaluation" not in card  # the final weights' evaluation is not this checkpoint's


def test_evaluating_a_checkpoint_writes_beside_it_not_inside(run, capsys):
    from sftlab import cli
    from sftlab.train.checkpoints import why_not_committed

    checkpoint = newest_checkpoint(run)
    before = sorted(p.name for p in checkpoint.iterdir())
    assert cli.main(["eval", "--adapter", str(checkpoint), "--max_new_tokens", "2"]) == 0
    assert f"wrote {run}/eval/{checkpoint.name}/results.json" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoint.iterdir()) == before and why_not_committed(checkpoint) is None


PEFT_ALONE = """
import json, sys
sys.modules["sftlab"] = None  # sftlab is not importable here
import torch
from peft import AutoPeftModelForCausalLM
run, ids, expected = sys.argv[1], json.loads(sys.argv[2]), torch.load(sys.argv[3])
model = AutoPeftModelForCausalLM.from_pretrained(run, dtype=torch.float32)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
print(json.dumps({"max_diff": (logits - expected).abs().max().item(), "base": model.peft_config["default"].base_model_name_or_path}))
"""


@pytest.mark.slow  # a second process loading torch and PEFT
def test_a_run_folder_loads_with_peft_alone_its_base_an_absolute_path(run, tmp_path):
    """adapter_config.json names the embedded base by its folder, so PEFT (and lm-eval, vLLM) resolve it
    without sftlab; sftlab itself still resolves the run's base by its `sftlab:` name (sftlab_config.yaml)."""
    from sftlab.model.load import adapter_base, resolve_model_path

    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(resolve_model_path("sftlab:tiny-glm4").resolve())
    assert adapter_base(run) == "sftlab:tiny-glm4"
    tuned, tokenizer = load_for_inference(adapter=str(run), device="cpu", dtype="float32")
    ids = ChatRenderer(tokenizer).prompt_ids([{"role": "user", "content": "你是谁？"}])
    with torch.no_grad():
        torch.save(tuned(torch.tensor([ids])).logits, tmp_path / "expected.pt")
    result = subprocess.run([sys.executable, "-c", PEFT_ALONE, str(run), json.dumps(ids), str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""},
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["max_diff"] < 1e-5 and out["base"] == config["base_model_name_or_path"]
