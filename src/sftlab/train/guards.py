"""What keeps a run from losing work or saving garbage: a graceful stop on SIGTERM/SIGINT, steps with a
non-finite loss or gradient skipped (never applied, never logged as 0.0), and no save of a non-finite tensor."""

import os
import signal
import sys
import threading

import torch
from transformers import TrainerCallback

from sftlab.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(TrainerCallback):
    """The first SIGTERM or SIGINT lets the current step finish, then a checkpoint is committed and training
    stops (the caller exits 143 or 130 with one line on how to resume); a second one exits at once."""

    def __init__(self):
        self.received: int | None = None
        self.stopping = False  # on every process, once any of them received a signal: nothing but the save runs
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
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # an evaluation due at this step would delay the exit by minutes


def _any_process(flag: bool) -> bool:
    """True on every process when it is true on one (the processes must save and stop at the same step)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.get_backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class NonFiniteSteps(TrainerCallback):
    """Skips an optimizer step whose gradients are not finite (a non-finite loss makes them so): parameters and
    optimizer state stay bitwise as they were. Counts the skipped steps into the logs; after `limit` in a row,
    stops the run with one line."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.skipped = limit, 0, 0
        self.last_committed: str | None = None

    def guard(self, optimizer) -> None:
        step = optimizer.step

        def guarded_step(*args, **kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads and not torch.isfinite(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).all():
                self.skipped += 1
                self.in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                if self.in_a_row >= self.limit:
                    where = f"; the last committed checkpoint is {self.last_committed}" if self.last_committed else ""
                    raise UserError(f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient and "
                                    f"were skipped (max_bad_steps {self.limit}): lower the learning rate, or check the "
                                    f"data and dtype{where}")
                return None
            self.in_a_row = 0
            return step(*args, **kwargs)

        optimizer.step = guarded_step

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
