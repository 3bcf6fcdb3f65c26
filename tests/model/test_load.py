import json

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
