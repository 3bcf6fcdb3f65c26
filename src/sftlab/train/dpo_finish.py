"""What a preference run (`sftlab dpo`) does after its final save, live or completed by --resume: probe replies,
the before/after judgement on held-out pairs (preference accuracy and margins against the reference, each model's
greedy replies, retention for LoRA), the report and the model card, and last the manifest marked complete."""

import contextlib
from pathlib import Path

from sftlab.chat_format import ChatRenderer
from sftlab.data.preference import Pair, render_pair
from sftlab.model.load import REFERENCE_ADAPTER, as_started, continued_adapter, load_for_inference
from sftlab.run_dir import (
    PREDICTIONS,
    append_jsonl,
    keep_lines,
    mark_complete,
)
from sftlab.train.callbacks import probe_records, run_probes
from sftlab.train.guards import StopAtOnce, Stopped, stopped_after_final_save
from sftlab.train.run_files import finish_settings, print_probes


def dpo_settings(config: dict) -> dict:
    """What the finish uses, from a resolved config (a live run's, or a completed one's with its amendments)."""
    return {**finish_settings(config), "beta": config["train"]["beta"], "start": config["model"]["model_name_or_path"],
            "stage": config.get("stage", "dpo").upper()}


def finish_dpo(model, tokenizer, out: Path, step: int, config: dict, heldout: list[dict], reference,
               sharded: str | None) -> None:
    """DPO's finish (train/stage.py), after the final save, on the main process: probe replies, the held-out
    judgement, report, model card, and last the manifest marked complete; a stop signal here ends it at once (the
    weights are safe). `config`: the resolved config; `reference`: the reference model where one is held."""
    started_from = continued_adapter(out)
    if started_from is not None and sharded is None and REFERENCE_ADAPTER not in model.peft_config:
        model.load_adapter(str(started_from), adapter_name=REFERENCE_ADAPTER)  # a run completed by --resume
    settings = dpo_settings(config)
    with StopAtOnce() as stop:
        try:
            write_dpo_finish(model, tokenizer, out, step, settings, heldout, reference, sharded)
        except Stopped:
            stopped_after_final_save(stop.received, out, "the steps after the final save", True)


def write_dpo_finish(model, tokenizer, out: Path, step: int, settings: dict, heldout: list[dict], reference,
                     sharded: str | None) -> None:
    from sftlab.eval.evaluate import write_eval
    from sftlab.eval.model_card import write_model_card
    from sftlab.eval.run_report import write_run_report
    from sftlab.eval.tables import table_text

    final = []
    if not sharded:
        prompts, system_prompt = settings["probe_prompts"], settings["system_prompt"]
        replies = run_probes(model, tokenizer, prompts, settings["probe_max_new_tokens"], system_prompt)
        final = probe_records(step, prompts, replies, final=True)
        keep_lines(out / PREDICTIONS, lambda record: not record.get("final"))
        append_jsonl(out / PREDICTIONS, final)
        records = heldout[:settings["final_eval_samples"]]
        if records:
            results, samples = judge(model, tokenizer, records, settings, reference)
            write_eval(out / "eval", results, samples)
            print(f"\nHeld-out pairs ({len(records)}): base = the reference (where {settings['stage']} started), "
                  f"tuned = after {settings['stage']}\n{table_text(results)}")
    write_run_report(out)
    write_model_card(out)
    mark_complete(out)
    if final:
        print_probes(final)


def judge(model, tokenizer, records: list[dict], settings: dict, reference) -> tuple[dict, list[dict]]:
    """Before (the reference) and after (the policy) on held-out pairs: the preference scores
    (eval/preference.py), and each model's greedy replies to the prompts scored against the chosen reply (stop
    rate and reply length: preference tuning is known to lengthen replies); the retention check for LoRA.
    `reference`: the reference model, or None for the policy as it started (LoRA: model/load.py, as_started) or,
    in full fine-tuning, the start loaded again."""

    from sftlab.eval.evaluate import evaluate, with_replies
    from sftlab.eval.preference import judge_pairs

    if reference is None and not hasattr(model, "disable_adapter"):  # full fine-tuning, its reference not kept
        reference = load_for_inference(model=settings["start"])[0]
    renderer = ChatRenderer(tokenizer)
    pairs = [Pair.from_record(r) for r in records]
    rendered = [render_pair(renderer, pair) for pair in pairs]
    results = judge_pairs(model, rendered, tokenizer.pad_token_id, settings["beta"], reference)
    conversations, tools = [[*p.prompt, p.chosen] for p in pairs], [p.tools for p in pairs]
    limit = settings["final_eval_max_new_tokens"]
    with (as_started(model) if reference is None else contextlib.nullcontext()):
        base, base_replies = evaluate(reference or model, tokenizer, conversations, limit, label="reference",
                                      tools=tools)
    tuned, tuned_replies = evaluate(model, tokenizer, conversations, limit, label="tuned", tools=tools)
    results = {"base": {**results["base"], **base}, "tuned": {**results["tuned"], **tuned}}
    if settings["retention_check"] and reference is None and hasattr(model, "disable_adapter"):
        from sftlab.eval.retention import adapter_retention

        results["retention"] = adapter_retention(model, tokenizer, settings["system_prompt"])
    return results, with_replies(conversations, {"base": base_replies, "tuned": tuned_replies})
