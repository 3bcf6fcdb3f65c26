import json
from pathlib import Path

import pytest

from sftlab.environment import TINY_MODEL_NAME
from sftlab.errors import UserError
from sftlab.model.load import adapter_base, load_tokenizer, resolve_model_path


def test_tiny_name_resolves(tiny_model_dir):
    assert resolve_model_path(TINY_MODEL_NAME) == tiny_model_dir


def test_missing_local_path_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"model path ./weights/nope does not exist"):
        resolve_model_path("./weights/nope")


def test_hub_id_offline_says_what_to_do():
    with pytest.raises(UserError, match=r"THUDM/glm-4-9b-hf is a Hub id, and the Hub is offline .*hf download"):
        resolve_model_path("THUDM/glm-4-9b-hf")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_adapter_without_config_is_rejected(tmp_path):
    with pytest.raises(UserError, match="no adapter_config.json"):
        adapter_base(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "sftlab:tiny-glm4"}))
    assert adapter_base(tmp_path) == "sftlab:tiny-glm4"


def test_glm_tokenizer_without_template_gets_glm4s(tiny_model_dir, tmp_path):
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).chat_template.startswith("[gMASK]<sop>")


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """An adapter folder as a run writes it (a LoRA of the tiny model, untrained)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sftlab.model.load import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY_MODEL_NAME))
    base.config._name_or_path = TINY_MODEL_NAME
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(out)
    return out


@pytest.fixture
def adapter_folder(saved_adapter, tmp_path):
    import shutil

    return Path(shutil.copytree(saved_adapter, tmp_path / "adapter"))


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes"])
@pytest.mark.parametrize("command", ["chat", "eval", "merge", "serve", "doctor"])
def test_a_damaged_adapter_is_one_line_in_every_command(adapter_folder, tmp_path, capsys, damage, command):
    from sftlab.cli import main

    weights = adapter_folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] if damage == "truncated" else b"")
    argv = {"chat": ["chat", "--adapter", str(adapter_folder)],
            "eval": ["eval", "--adapter", str(adapter_folder), "--data", "sftlab:demo", "--output", str(tmp_path / "e")],
            "merge": ["merge", "--adapter", str(adapter_folder), "--output", str(tmp_path / "m")],
            "serve": ["serve", "--adapter", str(adapter_folder)],
            "doctor": ["doctor", "--adapter", str(adapter_folder)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{weights} is damaged (" in err[0] and "cut short or is not a safetensors file" in err[0]
    assert "Traceback" not in err[0]


def test_an_adapter_holding_a_pickle_is_refused(adapter_folder):
    import torch
    from safetensors.torch import load_file

    from sftlab.model.load import load_for_inference

    weights = adapter_folder / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter_folder / "adapter_model.bin")  # harmless, but a pickle all the same
    weights.unlink()
    with pytest.raises(UserError, match="holds adapter_model.bin, a pickle: sftlab loads safetensors only"):
        load_for_inference(adapter=str(adapter_folder))


def test_a_model_folder_with_only_its_config_is_one_line(tiny_model_dir, tmp_path):
    import shutil

    from sftlab.model.load import load_for_inference

    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match=f"model folder {tmp_path} has no tokenizer"):
        load_for_inference(model=str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    with pytest.raises(UserError, match=f"{tmp_path}: no model.safetensors there"):
        load_for_inference(model=str(tmp_path))
