"""The run lifecycle any transformers or TRL trainer can take: a mixin and callbacks for what keeps a run from losing
work (token-budget micro-batches, bad steps skipped, checkpoints committed before the oldest is rotated out, a
resume that logs what an uninterrupted run logs), and `fit_and_save`, which trains, stops cleanly on a signal and
saves the final weights. `sftlab train` uses it with TRL's SFTTrainer; a second stage uses it with its own trainer:
`class MyTrainer(ReliableTrainer, DPOTrainer)`.
"""

from pathlib import Path

from transformers import TrainerCallback

from sftlab.errors import UserError
from sftlab.internals import checkpoint_dir, logged_loss_sum, logging_state, restore_logging_state
from sftlab.run_dir import (
    LOG_STATE,
    RESOLVED_CONFIG,
    has_final,
    is_complete,
    read_json,
    recorded_stage,
    stage_title,
    stage_verb,
    write_json,
)
from sftlab.train.batching import SamplerEpochCallback, TokenBudgetSampler
from sftlab.train.callbacks import ProbeCallback
from sftlab.train.checkpoints import RunLock, commit, rotate
from sftlab.train.guards import (
    BadSteps,
    StopOnSignal,
    raise_write_failure,
    refuse_non_finite,
    stopped_after_final_save,
    stopped_by_signal,
)
from sftlab.train.resume import record_amendment


class ReliableTrainer:
    """Mixin placed before a Trainer class. `token_sampler`: token-budget micro-batches (None: the trainer's own
    sampler); `bad_steps`: the guard that skips non-finite steps and stops a diverged run; `amendment`: what a
    resume changed, recorded as training begins."""

    def __init__(self, *args, token_sampler: TokenBudgetSampler | None = None, bad_steps: BadSteps | None = None,
                 amendment: dict | None = None, retention=None, **kwargs):
        self.token_sampler, self.bad_steps, self.amendment = token_sampler, bad_steps, amendment
        self.retention = retention  # a RetentionAtSaves among the callbacks (train/retention_guard.py), or None
        self.final_weights: dict | None = None  # which checkpoint's weights are final, and why (the manifest's)
        self.resumed_from: str | None = None
        guards = [bad_steps] if bad_steps is not None else []  # first: the log record it annotates is then written
        self.commits = CommitCheckpoints(self)
        kwargs["callbacks"] = [OnResume(self), *guards, *(kwargs.get("callbacks") or []), self.commits]
        super().__init__(*args, **kwargs)
        if token_sampler is not None:
            self.add_callback(SamplerEpochCallback(token_sampler))

    def train(self, resume_from_checkpoint=None, **kwargs):
        self.resumed_from = resume_from_checkpoint
        self.commits.keep, self.args.save_total_limit = self.args.save_total_limit, None  # see CommitCheckpoints
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self.args.save_total_limit = self.commits.keep
        if self.retention is not None and self.args.best_checkpoint:
            self.final_weights = self.retention.final_weights(self)
        return output

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.bad_steps is not None:
            self.bad_steps.observe_loss(loss)
        return loss

    def _get_train_sampler(self, train_dataset=None):  # private (internals.OVERRIDDEN_TRAINER_METHODS)
        return self.token_sampler if self.token_sampler is not None else super()._get_train_sampler(train_dataset)


class CommitCheckpoints(TrainerCallback):
    """Each checkpoint is committed (train/checkpoints.py) with the logging state beside it, and only then are old
    ones rotated out: the Trainer's own rotation (turned off while training) would delete them before the new one
    is complete. Weights with a NaN or an infinity are refused before a save."""

    def __init__(self, trainer):
        self.trainer, self.keep = trainer, None

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            refuse_non_finite(self.trainer.model, f"checkpoint of step {state.global_step}")

    on_epoch_end = on_step_end

    def on_save(self, args, state, control, **kwargs):
        saved = logging_state(self.trainer)  # a collective: on every process
        stopper = callback_of(self.trainer, StopOnSignal)
        if stopper is not None and stopper.stopping:
            saved["owed"] = stopper.owed  # the evaluation and probes a stop signal skipped: done on resume
        self.trainer.accelerator.wait_for_everyone()
        if args.should_save:
            folder = checkpoint_dir(args, state.global_step)
            write_json(folder / LOG_STATE, saved, indent=None)
            commit(folder)
            best = self.trainer.retention.best() if self.trainer.retention is not None else None
            rotate(folder.parent, self.keep, folder, protect=best)


class OnResume(TrainerCallback):
    """As training resumes: records the amendment it resumed with, and restores the logging state saved with the
    checkpoint, so every logged loss (and train_loss) equals an uninterrupted run's."""

    def __init__(self, trainer):
        self.trainer, self.restored = trainer, False

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            record_amendment(Path(args.output_dir), self.trainer.amendment)
        folder = self.trainer.resumed_from
        path = Path(folder) / LOG_STATE if folder else None
        if path is None or not path.exists():  # a fresh run, or a checkpoint written before sftlab kept it
            return
        saved = read_json(path)
        restore_logging_state(self.trainer, saved)
        self.restored = True
        self.do_what_was_owed(saved.get("owed", []), args, state, control)

    def do_what_was_owed(self, owed: list[str], args, state, control) -> None:
        """The evaluation, the probe replies and the retention check that the stopped step skipped (a stop signal
        saves at once), done now at that step with its weights, in the order an uninterrupted run does them: the
        logs then hold what they would have."""
        if "evaluate" in owed and self.trainer.eval_dataset is not None:
            self.trainer.evaluate()
        probe = callback_of(self.trainer, ProbeCallback)
        if "probes" in owed and probe is not None:
            probe.on_save(args, state, control, model=self.trainer.model)
        guard = self.trainer.retention
        if "retention" in owed and guard is not None:
            guard.on_train_begin(args, state, control, model=self.trainer.model)  # its base and history, read now
            guard.on_save(args, state, control, model=self.trainer.model)  # (this callback runs before it)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.restored and logs is not None and "train_loss" in logs and state.global_step:
            # the Trainer divides by the steps of this invocation; the sum restored covers every step
            logs["train_loss"] = logged_loss_sum(self.trainer) / state.global_step


def callback_of(trainer, kind):
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, kind)), None)


def run_in_output_dir(train_args, start, complete, stage: str) -> Path:
    """A stage's run in train_args.output_dir, under the folder's lock (held by the main process for the whole
    run): `start()` trains (or resumes) and returns the folder; a finished run is left as it is; a run whose
    final weights were saved but not its evaluation and report is given them by `complete(out, is_main)`. A resume
    of another stage's run, finished or not, is refused naming both."""
    out, is_main = Path(train_args.output_dir), train_args.process_index == 0
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder")
    recorded = recorded_stage(out) if train_args.resume and (out / RESOLVED_CONFIG).is_file() else stage
    if recorded != stage:
        raise UserError(f"--resume {out}: this run is {stage_title(recorded)}; this command is for "
                        f"{stage_title(stage)} (resume it with `{stage_verb(recorded)}`); or give this one another "
                        "output_dir")
    if train_args.resume and is_complete(out):
        print(f"run {out} is finished (its final weights, evaluation and report are there): nothing to resume, "
              "nothing changed")
        return out
    lock = RunLock(out) if is_main else None
    if lock is not None:
        lock.acquire()
    try:
        if train_args.resume and has_final(out):
            return complete(out, is_main)
        return start()
    finally:
        if lock is not None:
            lock.release()


def fit_and_save(trainer, stopper: StopOnSignal, resume_from: str | None, out: Path, write_manifest, save_final
                 ) -> None:
    """Trains, then saves the final weights: a stop signal lets its step finish and a checkpoint commit, then exits
    143 or 130 with the command that continues; a full disk is one line naming the committed checkpoint.
    `write_manifest()` runs on the main process before the final save (a run completed after a crash still says
    how it trained); `save_final()` on every process (sharded engines gather the weights)."""
    is_main = trainer.is_world_process_zero()
    stopper.install()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except (OSError, RuntimeError) as exc:
        raise_write_failure(exc, f"checkpoint-{trainer.state.global_step}", out)
    if stopper.received is not None:
        stopped_by_signal(stopper.received, trainer.state.global_step, out, is_main)
    if is_main:
        write_manifest()
    save_final()
    if stopper.received is not None:  # it arrived during the save, which was let finish
        stopped_after_final_save(stopper.received, out, "the final save", is_main)
    stopper.uninstall()


def train_and_finish(trainer, stopper: StopOnSignal, resume_from: str | None, out: Path, write_manifest, tokenizer,
                     base_name: str | None, finish) -> None:
    """fit_and_save (the final weights saved with `tokenizer`, the adapter naming `base_name` as its base), then
    `finish()` on the main process (probes, evaluation, report); the stop handlers are put back however it ends."""
    from sftlab.train.run_files import save_final

    try:
        fit_and_save(trainer, stopper, resume_from, out, write_manifest,
                     save_final=lambda: save_final(trainer, tokenizer, out, base_name))
        if trainer.is_world_process_zero():
            finish()
    finally:
        stopper.uninstall()


def sharded_engine(trainer) -> str | None:
    """"ZeRO-3" or "FSDP" where the weights are split across processes (the final save then needs every process,
    and no single process can generate), else None (one GPU, DDP, ZeRO-2)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            return "ZeRO-3"
    return None
