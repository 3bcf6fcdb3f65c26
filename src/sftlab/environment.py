"""What sftlab reads from the environment, in one small module every other module may import: where its
cache lives, whether the Hub is offline, and the name of the embedded default model."""

import os
from pathlib import Path

TINY_MODEL_NAME = "sftlab:tiny-glm4"  # built locally by sftlab.model.tiny


def cache_root() -> Path:
    """SFTLAB_HOME, else ~/.cache/sftlab: the tiny model and the prepared-data cache."""
    return Path(os.environ.get("SFTLAB_HOME", Path.home() / ".cache" / "sftlab"))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
