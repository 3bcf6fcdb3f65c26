"""Experiment tracking that never blocks: SwanLab online only with credentials, else local mode."""

import contextlib
import os
from importlib.util import find_spec
from pathlib import Path

from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

REPORT_TO_CHOICES = ("none", *INTEGRATION_TO_CALLBACK)  # every tracker transformers has a callback for
# the package each tracker needs, where its name differs from the tracker's (pip name, import names)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", ("tensorboard", "tensorboardX")),
                    "azure_ml": ("azureml-core", ("azureml",)), "flyte": ("flytekit", ("flytekit",)),
                    "kubeflow": ("kfp", ("kfp",))}


def check_report_to(reports: list[str]) -> None:
    """Raises ValueError for a tracker transformers does not know, or whose package is not installed."""
    for name in reports:
        if name not in REPORT_TO_CHOICES:
            raise ValueError(f"report_to: {name!r} is not one of {', '.join(REPORT_TO_CHOICES)}")
        pip_name, modules = TRACKER_PACKAGES.get(name, (name, (name,)))
        if name != "none" and not any(find_spec(module) for module in modules):
            raise ValueError(f"report_to: {name} needs `pip install {pip_name}`")


def swanlab_has_credentials() -> bool:
    if os.environ.get("SWANLAB_API_KEY"):
        return True
    root = Path(os.environ.get("SWANLAB_ROOT") or Path.home() / ".swanlab")
    return (Path.cwd() / ".swanlab" / ".netrc").exists() or (root / ".netrc").exists()


def start_swanlab(output_dir: str, run_name: str | None, config: dict) -> str:
    """Starts the SwanLab run that transformers' SwanLabCallback then reuses. Returns the mode used.

    The tutorial's run asked for a login interactively; here, without credentials, the run is local,
    under the run directory, and `swanlab watch` shows it."""
    import swanlab

    mode = os.environ.get("SWANLAB_MODE") or ("online" if swanlab_has_credentials() else "local")
    log_dir = str(Path(output_dir) / "swanlog")
    swanlab.init(project=os.environ.get("SWANLAB_PROJECT", "sftlab"), name=run_name, mode=mode,
                 log_dir=log_dir, config=config)
    if mode == "local":
        print(f"swanlab: no login found, logging locally. View with: swanlab watch {log_dir}")
    return mode


def active_swanlab():
    """The swanlab module when a run is active, else None (get_run raises when there is none)."""
    try:
        import swanlab

        return swanlab if swanlab.get_run() is not None else None
    except Exception:
        return None


def finish_swanlab() -> None:
    swanlab = active_swanlab()
    if swanlab is not None:
        swanlab.finish()


@contextlib.contextmanager
def tracked(args, config: dict, is_main: bool):
    """A stage's training with its SwanLab run (when report_to names swanlab), started with the resolved config
    and finished however training ends."""
    reports = [args.report_to] if isinstance(args.report_to, str) else (args.report_to or [])
    swanlab = "swanlab" in reports and is_main
    if swanlab:
        start_swanlab(str(args.output_dir), args.run_name, config)
    try:
        yield
    finally:
        if swanlab:
            finish_swanlab()
