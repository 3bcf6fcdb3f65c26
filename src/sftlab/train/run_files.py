"""What a training run writes outside training itself: its inputs before it trains (resolved config, manifest,
held-out and rejected rows, data report), its final weights (staged, the loadable marker moved in last), and its
finish (probes, held-out evaluation, retention, report, model card, the manifest marked complete). Any stage that
trains through train/lifecycle.py writes the same run folder.
"""

import os
import shutil
from pathlib import Path

from sftlab.chat_format import stop_token_ids
from sftlab.data.prepare import PreparedData
from sftlab.files import move_in
from sftlab.model.saving import save_tokenizer
from sftlab.run_dir import (
    ADAPTER_CONFIG,
    DATA_REPORT,
    HELDOUT,
    PREDICTIONS,
    REJECTED,
    RENDER_CHECK,
    RESOLVED_CONFIG,
    TRAINER_STATE,
    append_jsonl,
    keep_lines,
    mark_complete,
    read_json,
    read_yaml,
    write_json,
    write_jsonl,
    write_yaml,
)
from sftlab.train.callbacks import probe_records, run_probes
from sftlab.train.guards import StopAtOnce, Stopped, raise_write_failure, refuse_non_finite, stopped_after_final_save


def finish_settings(config: dict) -> dict:
    """What the steps after the final save use, from a resolved config: the live run's, or a completed run's
    record with its amendments."""
    return {**{name: config["train"][name] for name in FINISH_FIELDS}, "system_prompt": config["data"]["system_prompt"]}


FINISH_FIELDS = ("probe_prompts", "probe_max_new_tokens", "final_eval_samples", "final_eval_max_new_tokens",
                 "retention_check")


def finish_run(model, tokenizer, out: Path, step: int, config: dict, heldout: list[dict], reference,
               sharded: str | None) -> None:
    """SFT's finish (train/stage.py), after the final save, on the main process: probe replies, held-out
    evaluation, report, model card, and last the manifest marked complete (no generation where the weights are
    sharded: `sftlab eval` does it afterwards from the saved run). Each output is rewritten whole, so a run stopped
    here is completed by --resume without a record twice; and since the weights are safe, a stop signal here ends
    it at once. `config`: the resolved config; `reference`: unused (SFT holds none)."""
    with StopAtOnce() as stop:
        try:
            write_finish(model, tokenizer, out, step, finish_settings(config), heldout, sharded)
        except Stopped:
            stopped_after_final_save(stop.received, out, "the steps after the final save", True)


def write_finish(model, tokenizer, out: Path, step: int, settings: dict, heldout: list[dict], sharded: str | None
                 ) -> None:
    from sftlab.eval.evaluate import evaluate, with_replies, write_eval
    from sftlab.eval.model_card import write_model_card
    from sftlab.eval.run_report import write_run_report
    from sftlab.eval.tables import table_text

    final = []
    if not sharded:
        prompts, system_prompt = settings["probe_prompts"], settings["system_prompt"]
        replies = run_probes(model, tokenizer, prompts, settings["probe_max_new_tokens"], system_prompt)
        final = probe_records(step, prompts, replies, final=True)
        keep_lines(out / PREDICTIONS, lambda record: not record.get("final"))  # an interrupted finish's
        append_jsonl(out / PREDICTIONS, final)
        records = heldout[:settings["final_eval_samples"]]
        conversations, tools = [r["messages"] for r in records], [r.get("tools") for r in records]
        if conversations:
            results, replies = evaluate(model, tokenizer, conversations, settings["final_eval_max_new_tokens"],
                                        label="held-out", tools=tools)
            results = {"tuned": results}
            if settings["retention_check"] and hasattr(model, "disable_adapter"):
                from sftlab.eval.retention import adapter_retention

                results["retention"] = adapter_retention(model, tokenizer, system_prompt)
            write_eval(out / "eval", results, with_replies(conversations, {"tuned": replies}))
            print(f"\nHeld-out evaluation ({len(conversations)} conversations):\n{table_text(results)}")
    write_run_report(out)
    write_model_card(out)  # in place of PEFT's empty template
    mark_complete(out)
    if final:
        print_probes(final)


def write_training_manifest(out: Path, data: PreparedData, seed: int, chosen: dict) -> None:
    """The manifest as training ends: the run's own config (a resume may only amend it, in amendments.jsonl),
    the peak memory and what was chosen (attention, batches); `completed` false until the run's last step."""
    from sftlab.eval.run_report import peak_memory_mb, write_manifest

    record = read_yaml(out / RESOLVED_CONFIG)
    write_manifest(out, record, data.fingerprint, seed, {"peak_memory_mb": peak_memory_mb(), **chosen,
                                                         "completed": False})


def write_run_inputs(out: Path, config: dict, data) -> None:
    """How the run was made, written before training so even a crashed run says it."""
    from sftlab.eval.run_report import write_manifest

    write_yaml(out / RESOLVED_CONFIG, config)
    write_manifest(out, config, data.fingerprint, config["train"]["seed"])
    if data.examples:  # what `sftlab doctor` checks the saved template against
        write_json(out / RENDER_CHECK, {"samples": data.examples}, indent=None)
    write_jsonl(out / HELDOUT, data.heldout)
    if isinstance(data.rejected, Path):  # the prepared cache's file (SFT): copied, as large as it may be
        shutil.copyfile(data.rejected, out / (REJECTED + ".tmp"))
        os.replace(out / (REJECTED + ".tmp"), out / REJECTED)
    else:  # the rejected rows themselves (preference pairs)
        write_jsonl(out / REJECTED, data.rejected)
    write_json(out / DATA_REPORT, data.report)


def save_final(trainer, tokenizer, out: Path, base_name: str | None) -> None:
    """Writes the final weights, tokenizer and generation config into a staging folder, then moves them in.

    The marker of a loadable folder (adapter_config.json, or config.json for a full model) is moved last,
    so a crash mid-save never leaves a folder that looks complete. Called on every process: under ZeRO-3 and FSDP
    save_model gathers the sharded weights (a collective); everywhere only the main process writes."""
    refuse_non_finite(trainer.model, "final weights")  # each process checks the weights it holds
    staging = out / ".final.tmp"
    is_main = trainer.is_world_process_zero()
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
    except (OSError, RuntimeError) as exc:
        raise_write_failure(exc, "the final weights", out)
    if not is_main:
        return
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; sftlab_config.yaml says the same in YAML
    save_tokenizer(tokenizer, staging)
    generation_config = trainer.model.generation_config
    # the model's own stop ids plus the template's end of a turn (GLM-4: <|endoftext|>, <|user|>, <|observation|>)
    generation_config.eos_token_id = stop_token_ids(tokenizer, generation_config.eos_token_id)
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.save_pretrained(staging)
    if (staging / ADAPTER_CONFIG).exists():
        adapter_config = read_json(staging / ADAPTER_CONFIG)
        write_json(staging / ADAPTER_CONFIG, {**adapter_config, "base_model_name_or_path": base_name})
    marker = ADAPTER_CONFIG if (staging / ADAPTER_CONFIG).exists() else "config.json"
    trainer.state.save_to_json(str(staging / TRAINER_STATE))  # in before the marker: a completion reads it
    move_in(staging, out, last=marker)


def print_probes(records: list[dict]) -> None:
    print("\nProbe replies of the fine-tuned model:")
    for r in records:
        print(f"  Q: {r['prompt']}\n  A: {r['reply']}   [{r['finish_reason']}, {r['new_tokens']} tokens]")


