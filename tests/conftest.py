"""Shared fixtures. The suite runs with its own SFTLAB_HOME, set here at import, before any test module reads
the environment, and a guard fails the run if the user's real ~/.cache/sftlab changes while it runs.

`pytest -m "not slow"` is the quick loop; `make test` (and CI) runs everything."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a Hub lookup would take ~48 s to fail here
os.environ.setdefault("SWANLAB_MODE", "disabled")
TEST_HOME = Path(tempfile.mkdtemp(prefix="sftlab-test-home-"))
os.environ["SFTLAB_HOME"] = str(TEST_HOME)
# the libraries' own caches too: a test run writes nothing outside its home
os.environ["HF_DATASETS_CACHE"] = str(TEST_HOME / "hf-datasets")
os.environ["MPLCONFIGDIR"] = str(TEST_HOME / "matplotlib")
USER_CACHE = Path.home() / ".cache" / "sftlab"


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its size and modification time."""
    if not folder.exists():
        return {}
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session", autouse=True)
def user_cache_untouched():
    before = snapshot(USER_CACHE)
    yield
    after = snapshot(USER_CACHE)
    changed = sorted(set(before) ^ set(after) | {p for p in before.keys() & after.keys() if before[p] != after[p]})
    if changed:
        pytest.fail(f"the test suite changed the user's {USER_CACHE}: {changed[:5]}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def sftlab_home():
    os.environ["SFTLAB_HOME"] = str(TEST_HOME)
    yield TEST_HOME
    shutil.rmtree(TEST_HOME, ignore_errors=True)  # the real model alone is 538 MB: no run leaves it behind


@pytest.fixture(scope="session")
def tiny_model_dir(sftlab_home):
    from sftlab.model.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from sftlab.model.load import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The demo recipe trained once per distinct set of flags for the whole session, so modules that read a run
    share it instead of each training the demo: trained_run(*TRAINED) -> the run folder. A test that writes into
    a run trains its own."""
    from helpers import demo_args
    from sftlab.train.config import parse_args
    from sftlab.train.sft import train

    runs = {}

    def run(*flags: str):
        if flags not in runs:
            runs[flags] = train(*parse_args(demo_args(tmp_path_factory.mktemp("run") / "run", *flags)))
        return runs[flags]

    return run
