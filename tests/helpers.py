"""What several test modules share (tests/ is on the import path: `from helpers import REPO`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def demo_args(out: Path, *flags: str) -> list[str]:
    """`sftlab train` arguments for the demo recipe into `out`, without a tracker, with `flags` winning."""
    return ["--config", str(DEMO_CONFIG), "--output_dir", str(out), "--report_to", "none", *flags]


# the run modules share through conftest's trained_run when they only read it: trained long enough to answer and
# stop (20 epochs of the demo), two checkpoints, no evaluation (the modules that test evaluation train their own)
TRAINED = ("--num_train_epochs", "20", "--save_steps", "0.5", "--eval_strategy", "no", "--final_eval_samples", "0")
