"""What several test modules share (tests/ is on the import path: `from helpers import REPO`)."""

import contextlib
import socket
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def demo_args(out: Path, *flags: str) -> list[str]:
    """`sftlab train` arguments for the demo recipe into `out`, without a tracker, with `flags` winning."""
    return ["--config", str(DEMO_CONFIG), "--output_dir", str(out), "--report_to", "none", *flags]


# the run modules share through conftest's trained_run when they only read it: trained long enough to answer and
# stop (20 epochs of the demo), two checkpoints, no evaluation (the modules that test evaluation train their own)
TRAINED = ("--num_train_epochs", "20", "--save_steps", "0.5", "--eval_strategy", "no", "--final_eval_samples", "0")


QUESTION = [{"role": "user", "content": "你是谁？"}]


def killed_before_final_save(run: Path, copy: Path) -> Path:
    """A copy of a finished LoRA run as if killed after its last checkpoint, before its final save."""
    import shutil

    shutil.copytree(run, copy)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (copy / name).unlink()
    return copy


@contextlib.contextmanager
def serving(app):
    """The app on a free loopback port, in a thread, as `sftlab serve` runs it; yields its base URL."""
    import uvicorn

    from sftlab.infer import http

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_keep_alive=http.KEEP_ALIVE_S, http=http.header_timeout_protocol()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.engine.close()
