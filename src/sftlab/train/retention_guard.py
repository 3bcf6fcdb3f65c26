"""Retention during training, and the best checkpoint kept (retention_at_saves, retention_stop, best_checkpoint).

As training starts, the base answers the general probes (eval/retention.py's, the final check's own) and its
losses on its own replies are measured, once, and kept in the run folder (a resume reads them back: the weights it
resumes are no longer the base's). At every save the model in training answers the same probes and is scored on
the base's replies: the same measures and verdict as the final check, so the check at the last save is the final
verdict (the same probes, rules and thresholds), not a cheaper stand-in that could disagree with it. Cost: one
greedy pass over 60 short prompts and one scoring pass per save.

Each save's record (step, verdict, retained share, accuracy, loss rise, and the held-out loss evaluated at that
step) goes to trainer_log.jsonl as retention/* beside the loss, to the tracker, and into the checkpoint before it
is committed. `retention_stop`: `retention_patience` saves in a row whose verdict is degraded (or one lost) end
the run after that checkpoint is committed. `best_checkpoint`: as training ends, the final weights are the best
checkpoint's, by this rule:

    among the checkpoints whose retention is kept, the lowest held-out loss (the latest of them when the run has
    no held-out loss); when none is kept, the last weights, and the run says so.

The best checkpoint so far is never rotated out (save_total_limit counts the others).
"""

from pathlib import Path

from transformers import TrainerCallback

from sftlab.eval.retention import answer, knows_too_little, reply_losses, shipped_probes, summarize
from sftlab.infer.generate import Reply
from sftlab.internals import checkpoint_dir, load_checkpoint_weights
from sftlab.run_dir import (
    RETENTION_BASE,
    RETENTION_RECORD,
    TRAINER_LOG,
    append_jsonl,
    read_json,
    read_jsonl,
    write_json,
)

KEPT = "kept"
LOGGED = ("verdict", "retained", "tuned_accuracy", "loss_rise")


class RetentionAtSaves(TrainerCallback):
    """The retention check at every save (see the module's docstring). Placed before the checkpoint's commit."""

    def __init__(self, tokenizer, out: Path, system_prompt: str | None, stop: bool, stopper=None, patience: int = 2):
        self.tokenizer, self.out, self.system_prompt, self.stop = tokenizer, Path(out), system_prompt, stop
        self.patience = patience  # degraded saves in a row that end the run (a lost one ends it at once)
        self.stopper = stopper  # a StopOnSignal: the save a stop signal asks for is not checked
        self.probes = shipped_probes()
        self.base: dict | None = None  # {"replies", "losses"} or {"n/a": why}
        self.history: list[dict] = []  # one record per checked save, this run's and (on resume) the earlier ones'

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        path = self.out / RETENTION_BASE
        if path.exists():
            self.base = read_json(path)
        elif state.global_step == 0:  # the weights are the base's: a LoRA update starts at zero
            self.base = self.measure_base(model)
            write_json(path, self.base)
        else:
            print(f"retention at saves: {path} is missing (a run started by an older sftlab): not checked")
            return
        self.history = [{"step": r["step"], **{k: r.get(f"retention/{k}") for k in LOGGED},
                         "eval_loss": r.get("retention/eval_loss")}
                        for r in read_jsonl(self.out / TRAINER_LOG) if "retention/verdict" in r]

    def measure_base(self, model) -> dict:
        replies = answer(model, self.tokenizer, self.probes, self.system_prompt, label="base")
        if knows_too_little(self.probes, replies):
            return {"n/a": "the base answers too few general probes for a retention check to mean anything"}
        losses = reply_losses(model, self.tokenizer, self.probes, replies, self.system_prompt)
        return {"replies": [vars(r) for r in replies], "losses": losses}

    def on_save(self, args, state, control, model=None, **kwargs):
        if (not state.is_world_process_zero or not self.base or "n/a" in self.base
                or getattr(self.stopper, "stopping", False)):
            return control
        base = [Reply(**r) for r in self.base["replies"]]
        tuned = answer(model, self.tokenizer, self.probes, self.system_prompt, label="tuned")
        tuned_losses = reply_losses(model, self.tokenizer, self.probes, base, self.system_prompt)
        summary = summarize(self.probes, base, tuned, self.base["losses"], tuned_losses)
        record = {"step": state.global_step, **{k: summary[k] for k in LOGGED},
                  "eval_loss": eval_loss_at(state.log_history, state.global_step)}
        self.history.append(record)
        write_json(checkpoint_dir(args, state.global_step) / RETENTION_RECORD,
                   {**record, "why": summary["why"], "changed": changed_answers(summary)})
        append_jsonl(self.out / TRAINER_LOG, [{"step": state.global_step, "epoch": state.epoch,
                                               **{f"retention/{k}": v for k, v in record.items() if k != "step"}}])
        log_to_tracker(record)
        print(f"retention at step {state.global_step}: {summary['verdict']}: {summary['why']}", flush=True)
        if self.stop and self.should_stop():
            best = self.best()
            then = f"the final weights will be {best}'s (the best kept)" if best else "no checkpoint was kept"
            row = f" ({self.patience} saves in a row)" if summary["verdict"] != "lost" and self.patience > 1 else ""
            print(f"retention_stop: retention is {summary['verdict']} at step {state.global_step}{row}: ending the "
                  f"run after this checkpoint; {then}", flush=True)
            control.should_training_stop = True
        return control

    def should_stop(self) -> bool:
        """A lost save, or `patience` saves in a row that are not kept."""
        recent = [r["verdict"] for r in self.history[-self.patience:]]
        return recent[-1] == "lost" or (len(recent) == self.patience and KEPT not in recent)

    def best(self) -> str | None:
        """The best checkpoint by the module's rule among the checks so far, or None when none is kept."""
        kept = [r for r in self.history if r["verdict"] == KEPT]
        if not kept:
            return None
        with_loss = [r for r in kept if r["eval_loss"] is not None]
        chosen = min(with_loss, key=lambda r: (r["eval_loss"], -r["step"])) if with_loss else kept[-1]
        return f"checkpoint-{chosen['step']}"

    def final_weights(self, trainer) -> dict | None:
        """As training ends: the best checkpoint's weights loaded when they are not the last ones (on every
        process: the choice is the main process's, sent to the others); the record of the choice for the manifest
        and the card (None when nothing was checked)."""
        choice = [self.choice(trainer.state.global_step) if trainer.is_world_process_zero() else None]
        if trainer.args.world_size > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(choice)
        record = choice[0]
        if record is not None and record["step"] != trainer.state.global_step:
            load_checkpoint_weights(trainer, str(checkpoint_dir(trainer.args, record["step"])))
        return record

    def choice(self, last_step: int) -> dict | None:
        if not self.history:
            return None
        best, last = self.best(), self.history[-1]
        rule = ("lowest held-out loss among the checkpoints whose retention is kept (the latest kept one without "
                "a held-out loss)")
        if best is None:
            print("best checkpoint: no checkpoint's retention is kept: the final weights are the last ones",
                  flush=True)
            return {"checkpoint": None, "step": last_step, "rule": rule, "retention": "none kept",
                    "checks": self.history}
        step = int(best.removeprefix("checkpoint-"))
        chosen = next(r for r in self.history if r["step"] == step)
        if step != last_step:
            print(f"best checkpoint: {best} (of {len(self.history)} checked; the last, step {last['step']}, is "
                  f"{last['verdict']}): its weights are the final weights", flush=True)
        return {"checkpoint": best, "step": step, "rule": rule, "retention": chosen["verdict"],
                "eval_loss": chosen["eval_loss"], "checks": self.history}


def changed_answers(summary: dict) -> list[dict]:
    """The probes whose answer changed at this save (right at the base and wrong now, or the reverse): what a user
    reads to tell a damaged model from borderline answers flipping."""
    return [{"prompt": p["prompt"], "lost": p["base_correct"], "base": p["base"], "tuned": p["tuned"]}
            for p in summary["per_probe"] if p["base_correct"] is not None and p["base_correct"] != p["tuned_correct"]]


def eval_loss_at(log_history: list[dict], step: int) -> float | None:
    """The held-out loss evaluated at `step` (the Trainer evaluates before it saves), or None."""
    return next((r["eval_loss"] for r in reversed(log_history) if "eval_loss" in r and r.get("step") == step), None)


def log_to_tracker(record: dict) -> None:
    from sftlab.train.tracking import active_swanlab

    swanlab = active_swanlab()
    if swanlab is not None:
        swanlab.log({f"retention/{k}": v for k, v in record.items() if isinstance(v, int | float) and k != "step"},
                    step=record["step"])
