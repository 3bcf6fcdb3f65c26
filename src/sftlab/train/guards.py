"""What keeps a run from losing work or saving garbage: a graceful stop on SIGTERM/SIGINT (and a prompt one after the
final save), steps with a non-finite loss or gradient skipped (never applied, never logged as 0.0), a run that
diverges stopped, and no save of a non-finite tensor."""

import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from sftlab.errors import UserError, write_failure
from sftlab.run_dir import recorded_stage, stage_verb
from sftlab.train.checkpoints import newest_committed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(TrainerCallback):
    """The first SIGTERM or SIGINT lets the current step finish, then a checkpoint is committed and training
    stops (the caller exits 143 or 130 with one line on how to resume); a second one exits at once."""

    def __init__(self):
        self.received: int | None = None
        self.stopping = False  # on every process, once any of them received a signal: nothing but the save runs
        self.owed: list[str] = []  # what the stopped step skipped: "evaluate", "probes", "retention"
        self.previous = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint (send it again to quit "
              "at once)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if _any_process(self.received is not None):
            self.stopping = True
            # what this step was due to do besides the save: its checkpoint records it, and a resume does it then
            self.owed = [name for name, due in (("evaluate", control.should_evaluate), ("probes", control.should_save),
                                                ("retention", control.should_save)) if due]
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # an evaluation due at this step would delay the exit by minutes


class Stopped(BaseException):
    """Raised by StopAtOnce's handler (a BaseException: no library's `except Exception` swallows it)."""


class StopAtOnce:
    """After the final save, where nothing is lost by stopping (--resume redoes what is missing): a SIGTERM or
    SIGINT raises Stopped in the main thread at once, instead of waiting for a minutes-long evaluation."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            raise Stopped(signum)


def _any_process(flag: bool) -> bool:
    """True on every process when it is true on one (the processes must save and stop at the same step)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.get_backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class BadSteps(TrainerCallback):
    """Bad optimizer steps, counted in a row; `limit` in a row stop the run with one line naming what they were.

    - non-finite: a NaN or infinite gradient (a non-finite loss makes it so). The step is skipped: parameters and
      optimizer state stay bitwise as they were; counted into the logs as skipped_steps.
    - finite divergence, which would otherwise end with rc 0 and a dead model: every gradient exactly zero (the
      weights went where nothing flows back), or a loss above DIVERGED_LOSS times the mean of the first
      START_STEPS steps. These steps are applied as usual (a hard batch can be legitimately high); only a run of
      them stops training."""

    START_STEPS = 5
    DIVERGED_LOSS = 3.0

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.skipped = limit, 0, 0
        self.last_committed: str | None = None
        self.pending_loss = None  # the loss summed over this step's micro-batches, on the device (one sync a step)
        self.start_losses: list[float] = []

    def observe_loss(self, loss) -> None:
        loss = loss.detach().float()
        self.pending_loss = loss if self.pending_loss is None else self.pending_loss + loss

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """Before each optimizer step (after clipping, which keeps a non-finite gradient non-finite): a bad step's
        gradients are dropped, so the optimizer step that follows touches no weight and no optimizer state (the
        optimizers skip parameters without a gradient)."""
        self.check_step(optimizer)

    def check_step(self, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]) if grads else None
        loss, self.pending_loss = self.pending_loss, None
        if norms is not None and not torch.isfinite(norms).all():
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)
            self._bad("had a non-finite loss or gradient and were skipped", "lower the learning rate, or check "
                      "the data and dtype")
            return
        why = self._diverged(norms, loss)
        if why:
            self._bad(why, "the run has diverged: lower the learning rate (or raise warmup_steps)")
        else:
            self.in_a_row = 0

    def _diverged(self, norms, loss) -> str | None:
        if norms is not None and bool((norms == 0).all()):
            return "had a gradient of exactly zero"
        if loss is None:
            return None
        value = loss.item()
        if len(self.start_losses) < self.START_STEPS:
            self.start_losses.append(value)
            return None
        start = sum(self.start_losses) / len(self.start_losses)
        if start > 0 and value > self.DIVERGED_LOSS * start:
            return f"had a loss over {self.DIVERGED_LOSS:g}x that of the first {self.START_STEPS} steps ({start:.4g})"
        return None

    def _bad(self, what: str, advice: str) -> None:
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            where = f"; the last committed checkpoint is {self.last_committed}" if self.last_committed else ""
            raise UserError(f"{self.in_a_row} optimizer steps in a row {what} (max_bad_steps {self.limit}): "
                            f"{advice}{where}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["skipped_steps"] = self.skipped

    def on_save(self, args, state, control, **kwargs):
        self.last_committed = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


def refuse_non_finite(model, what: str) -> None:
    """Raises UserError naming the first trainable tensor (every tensor of a fully trained model) that holds a
    NaN or an infinity: such weights are never saved."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, param in trainable or list(model.named_parameters()):
        if not torch.isfinite(param.detach()).all():
            bad = (~torch.isfinite(param.detach())).sum().item()
            raise UserError(f"refusing to save the {what}: {name} has {bad} non-finite values of {param.numel()}")


def raise_write_failure(exc: BaseException, what: str, out: Path) -> None:
    """A full disk or an unwritable folder while saving: one line naming it, and the newest committed checkpoint,
    which the failed save left intact; anything else is raised as it was."""
    why = write_failure(exc)
    if why is None:
        raise exc
    committed, _ = newest_committed(out)
    kept = f"{committed} is committed and intact" if committed else "no checkpoint was committed yet"
    detail = getattr(exc, "filename", None) or str(exc).strip().splitlines()[0][:200]
    raise UserError(f"could not save {what} in {out}: {why} ({detail}). {kept}: free space (or make the folder "
                    "writable) and continue with --resume") from exc


def stopped_after_final_save(signum: int, out: Path, during: str, is_main: bool) -> None:
    """One line when a stop signal ends a run after its final weights were saved; exits 143 or 130."""
    if is_main:
        print(f"stopped by {signal.Signals(signum).name} during {during}: the final weights in {out} are saved; "
              f"complete the evaluation and report with: {resume_command(out)}", flush=True)
    raise SystemExit(128 + signum)


def resume_command(out: Path) -> str:
    """The command that goes on with the run in `out`: this one, where it is its stage's verb (`sftlab dpo ...`),
    else the verb with "..." (a run started from Python)."""
    verb = stage_verb(recorded_stage(out))
    command = shlex.join(["sftlab", *sys.argv[1:]]) if sys.argv[1:2] == verb.split()[1:] else f"{verb} ..."
    return command + ("" if "--resume" in sys.argv else " --resume")


def stopped_by_signal(signum: int, step: int, out: Path, is_main: bool) -> None:
    """One line on where the run stopped and how to go on; exits 143 (SIGTERM) or 130 (SIGINT)."""
    if is_main:
        print(f"stopped by {signal.Signals(signum).name} after step {step}: {out / f'checkpoint-{step}'} is "
              f"committed; continue with: {resume_command(out)}", flush=True)
    raise SystemExit(128 + signum)
