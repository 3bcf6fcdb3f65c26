"""Shared fixtures: the tiny GLM-4 is built once per session into a temporary SFTLAB_HOME (no network)."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a Hub lookup would take ~48 s to fail here
os.environ.setdefault("SWANLAB_MODE", "disabled")


@pytest.fixture(scope="session", autouse=True)
def sftlab_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("sftlab_home")
    os.environ["SFTLAB_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(sftlab_home):
    from sftlab.model.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from sftlab.model.load import load_tokenizer

    return load_tokenizer(tiny_model_dir)
