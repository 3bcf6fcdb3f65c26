"""The run lifecycle (train/lifecycle.py) is not SFT's alone: a second trainer class takes it by the mixin, with
checkpoints committed before rotation, the logging state beside them, and the bad-step guard in the loop."""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from sftlab.run_dir import LOG_STATE
from sftlab.train.checkpoints import why_not_committed
from sftlab.train.guards import BadSteps
from sftlab.train.lifecycle import ReliableTrainer


class PlainTrainer(ReliableTrainer, Trainer):
    """What a second stage (DPO next) writes: its trainer class, behind the same mixin."""


def test_a_second_trainer_class_takes_the_run_lifecycle(tiny_model_dir, tmp_path, capsys):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 8
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, save_total_limit=1,
                             per_device_train_batch_size=2, logging_steps=1, report_to="none", use_cpu=True,
                             disable_tqdm=True)
    guard = BadSteps(limit=3)
    trainer = PlainTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), bad_steps=guard)
    trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]  # checkpoint-2 rotated out after the commit
    assert why_not_committed(tmp_path / "checkpoint-4") is None
    assert set((tmp_path / "checkpoint-4" / LOG_STATE).read_text().split('"')[1::2]) >= {
        "pending_loss", "last_logged_step", "logged_loss_sum"}
    assert args.save_total_limit == 1  # the Trainer's own rotation was off only while training
    assert guard.skipped == 0 and guard.in_a_row == 0 and len(guard.start_losses) == 4  # it saw every step
    assert capsys.readouterr().out.count("'skipped_steps': 0") == 4  # the guard annotates every logged step
