"""`sftlab eval`: held-out loss and perplexity on the supervised tokens, batched greedy generation, text
metrics, the stop rate; with --compare_base, the same for the base model and a side-by-side."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from sftlab.chat_format import ChatRenderer
from sftlab.chat_tools import message_text
from sftlab.config import Range, check_fields
from sftlab.data.convert import openai_to_messages
from sftlab.errors import UserError
from sftlab.eval import preference, retention
from sftlab.eval.losses import heldout_loss
from sftlab.eval.metrics import text_scores
from sftlab.eval.run_report import write_run_report
from sftlab.eval.tables import comparison_markdown, table_text
from sftlab.files import write_atomic
from sftlab.infer.generate import SamplingArgs, generate_replies
from sftlab.model.load import inference_tokenizer, load_for_inference, with_system_prompt
from sftlab.run_dir import (
    EVAL_DIR,
    EVAL_FILES,
    HELDOUT,
    REPORT,
    RESULTS,
    RETENTION,
    SAMPLES,
    TRAINER_STATE,
    check_output_folder,
    read_heldout,
    read_json,
    read_jsonl,
    recorded_reply_limit,
    recorded_system_prompt,
    run_folder,
    run_of_checkpoint,
    run_record,
    write_json,
    write_jsonl,
)

DEFAULT_MAX_NEW_TOKENS = 256  # for a model folder, which has no reply limit of its own


def evaluate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 256,
             batch_size: int = 16, label: str = "", rules: list | None = None, tools: list | None = None
             ) -> tuple[dict, list]:
    """Metrics over conversations whose last message is the reference reply; and the replies. `label` names
    the model in the progress bars; `rules`, per conversation an answer rule or None, adds answer_accuracy;
    `tools`, per conversation its tools or None."""
    loss = heldout_loss(model, tokenizer, conversations, progress=f"{label} loss".strip(), tools=tools)
    greedy = SamplingArgs(max_new_tokens=max_new_tokens, temperature=0)
    replies = generate_replies(model, tokenizer, [c[:-1] for c in conversations], greedy, batch_size=batch_size,
                               progress=f"{label} replies".strip(), tools=tools)
    scores = [text_scores(r.text, message_text(c[-1])) for r, c in zip(replies, conversations)]
    n = len(conversations)
    results = {"eval_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3),
               **{k: round(sum(s[k] for s in scores) / n, 4) for k in ("rouge_1", "rouge_2", "rouge_l", "bleu_4")},
               **answer_accuracy(replies, rules),
               "stop_rate": round(sum(r.finish_reason == "stop" for r in replies) / n, 4),
               "mean_new_tokens": round(sum(r.new_tokens for r in replies) / n, 2), "max_new_tokens": max_new_tokens,
               "n": n}
    return results, replies


def answer_accuracy(replies: list, rules: list | None) -> dict:
    """{"answer_accuracy": share of the replies with an answer rule that it accepts}, or {} with no rule."""
    checked = [(r, rule) for r, rule in zip(replies, rules or []) if rule]
    if not checked:
        return {}
    return {"answer_accuracy": round(sum(retention.correct(rule, r.text) for r, rule in checked) / len(checked), 4)}


def load_conversations(data: str | None, run_dir: Path | None, tokenizer) -> tuple[list, list, list]:
    """The held-out split of a run (heldout.jsonl; a checkpoint's is its run's), or any data file sftlab can read
    (rows that cannot be rendered with the model's template are left out); and per conversation the row's answer
    rule (`"any": [...]` or `"all": [...]`, as in the retention probes) or None."""
    if data is None:
        run_dir = (run_folder(run_dir) or run_dir) if run_dir else None
        heldout = run_dir / HELDOUT if run_dir else None
        if heldout is None or not heldout.exists():
            raise UserError("no held-out split here (heldout.jsonl): pass --data FILE")
        records = [openai_to_messages(as_conversation(record)) for record in read_heldout(run_dir)]  # GLM-4's too
        if not records:
            raise UserError(f"{heldout} holds no conversations: pass --data FILE")
        return [m for m, _ in records], [t for _, t in records], [None] * len(records)
    from sftlab.config import CleanArguments
    from sftlab.data.cleaner import clean_rows
    from sftlab.data.sources import dataset_specs, read_datasets

    rows, _ = read_datasets(dataset_specs([data]), seed=0)  # as training reads a dataset: columns, max_samples
    rules = {(r.source, r.line): retention.answer_rule(r.row, f"{r.source}:{r.line}") for r in rows}
    result = clean_rows(rows, CleanArguments(near_dedup=False), ChatRenderer(tokenizer), enabled=False)
    if result.rejected:
        print(f"eval: {len(result.rejected)} of {result.rows_read} rows left out: {result.reasons()}")
    if not result.kept:
        raise UserError(f"--data {data}: no conversation to evaluate ({result.rows_read} rows read, all left out: "
                        f"{result.reasons()})")
    return ([kept.messages for kept in result.kept], [kept.tools for kept in result.kept],
            [rules[kept.source, kept.line] for kept in result.kept])


def as_conversation(record: dict) -> dict:
    """A held-out record as a conversation: a preference pair's (a DPO run's) is its prompt and chosen reply."""
    if "chosen" in record and "prompt" in record:
        return {"messages": [*record["prompt"], *record["chosen"]], **({"tools": record["tools"]} if
                                                                       record.get("tools") else {})}
    return record


def write_eval(out_dir: Path, results: dict, samples: list[dict]) -> None:
    """results.json, report.md, samples.jsonl, and retention.jsonl (every probe, base vs tuned) when the
    retention check ran."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / SAMPLES, samples)
    if "per_probe" in results.get("retention", {}):
        results = {**results, "retention": dict(results["retention"])}
        probes = results["retention"].pop("per_probe")
        write_jsonl(out_dir / RETENTION, probes)
    write_atomic(out_dir / REPORT, comparison_markdown(results, samples))
    write_json(out_dir / RESULTS, results)


def run_eval(model: str | None, adapter: str | None, data: str | None, compare_base: bool,
             max_new_tokens: int | None, batch_size: int, output: str | None = None,
             retention_data: str | None = None, harness: dict | None = None) -> Path:
    """Evaluates the run (or model folder) on its held-out split or `data`; with compare_base, the base too,
    and the retention check (retention.py) on the shipped probes, or on `retention_data`'s conversations.
    max_new_tokens None: the run's reply limit (from its data), or 256 for a model folder. `harness`: the
    arguments of harness.task_scores (lm-evaluation-harness tasks), scored on each side too."""
    run_dir = Path(adapter or model)
    if output is None and not run_dir.is_dir():
        raise UserError(f"{adapter or model} is not a run folder: pass --output DIR for the results")
    # the data first: a file with nothing usable is an error before a (possibly 9B) model is loaded
    tokenizer = inference_tokenizer(model, adapter)
    conversations, tools, rules = load_conversations(data, run_dir if run_dir.is_dir() else None, tokenizer)
    system_prompt = recorded_system_prompt(run_dir)  # asked as training asked: held-out rows already carry it
    conversations = [with_system_prompt(c, system_prompt) for c in conversations]
    max_new_tokens = max_new_tokens or recorded_reply_limit(run_dir) or DEFAULT_MAX_NEW_TOKENS
    probes, pairs = None, None
    if compare_base:
        probes = (retention.probes_from(load_conversations(retention_data, None, tokenizer)[0]) if retention_data
                  else retention.shipped_probes())
    # a run (LoRA, or full fine-tuning evaluated as --model RUN) is "tuned"; any other model folder is "model"
    side = "tuned" if adapter or run_folder(run_dir) is not None else "model"
    results, replies = {}, {}
    if compare_base:  # the base first, then the tuned model: one model in memory at a time
        from sftlab.model.load import adapter_base, continued_adapter

        started_from = continued_adapter(run_folder(adapter) or Path(adapter)) if not model else None
        base, _ = (load_for_inference(adapter=str(started_from)) if started_from  # DPO over an SFT adapter: that
                   else load_for_inference(model or adapter_base(Path(adapter))))  # run, as DPO started from it
        results["base"], replies["base"] = evaluate(base, tokenizer, conversations, max_new_tokens, batch_size, "base",
                                                    rules, tools)
        pairs = heldout_pairs(data, run_dir, tokenizer)
        if pairs:  # a DPO run's held-out pairs: the base is its reference
            base_logps = preference.pair_logps(base, pairs, tokenizer.pad_token_id, progress="base preferences")
            results["base"].update(preference.preference_scores(base_logps, base_logps, pairs_beta(run_dir)))
        add_task_scores(results, "base", base, tokenizer, harness)
        base_probe_replies = retention.answer(base, tokenizer, probes, system_prompt, batch_size, "base")
        if retention.knows_too_little(probes, base_probe_replies):
            results["retention"] = retention.unknowing_base(probes, base_probe_replies)
        else:
            base_losses = retention.reply_losses(base, tokenizer, probes, base_probe_replies, system_prompt)
        del base
    tuned, tokenizer = load_for_inference(model, adapter, tokenizer=tokenizer)
    results[side], replies[side] = evaluate(tuned, tokenizer, conversations, max_new_tokens, batch_size, side,
                                            rules, tools)
    if compare_base and pairs:
        tuned_logps = preference.pair_logps(tuned, pairs, tokenizer.pad_token_id, progress="tuned preferences")
        results[side].update(preference.preference_scores(tuned_logps, base_logps, pairs_beta(run_dir)))
    add_task_scores(results, side, tuned, tokenizer, harness)
    if compare_base and "retention" not in results:
        tuned_probe_replies = retention.answer(tuned, tokenizer, probes, system_prompt, batch_size, "tuned")
        tuned_losses = retention.reply_losses(tuned, tokenizer, probes, base_probe_replies, system_prompt)
        results["retention"] = retention.summarize(probes, base_probe_replies, tuned_probe_replies, base_losses,
                                                   tuned_losses)
    out = Path(output) if output else eval_folder(run_dir, data)
    write_eval(out, results, with_replies(conversations, replies, rules))
    return out


def heldout_pairs(data: str | None, run_dir: Path, tokenizer) -> list[dict] | None:
    """A DPO run's held-out pairs, rendered as training rendered them (None for any other run, or with --data)."""
    from sftlab.data.preference import Pair, render_pair

    run = run_folder(run_dir) if data is None and run_dir.is_dir() else None
    records = read_jsonl(run / HELDOUT) if run is not None else []
    if not records or "chosen" not in records[0]:
        return None
    renderer = ChatRenderer(tokenizer)
    return [render_pair(renderer, Pair.from_record(r)) for r in records]


def pairs_beta(run_dir: Path) -> float:
    return float(((run_record(run_dir) or {}).get("train") or {}).get("beta", 0.1))


def add_task_scores(results: dict, side: str, model, tokenizer, harness: dict | None) -> None:
    """lm-evaluation-harness scores as results[side]["tasks"] ({"task/metric": value}), with which way is better
    in results["tasks_higher_is_better"]."""
    if harness:
        from sftlab.eval.harness import task_scores

        results[side]["tasks"], results["tasks_higher_is_better"] = task_scores(model, tokenizer, **harness)


def eval_folder(run_dir: Path, data: str | None) -> Path:
    """RUN/eval for the run's own held-out split; RUN/eval/<data file stem> for any other data, so an
    evaluation on other data never replaces the held-out results. A checkpoint (RUN/checkpoint-N) is evaluated
    into RUN/eval/checkpoint-N: nothing is written inside a committed checkpoint."""
    run = run_of_checkpoint(run_dir)
    folder = run / EVAL_DIR / run_dir.name if run is not None else run_dir / "eval"
    return folder if data is None else folder / Path(data).stem.replace(":", "-")  # sftlab:identity-checks


def with_replies(conversations: list[list[dict]], replies: dict[str, list], rules: list | None = None) -> list[dict]:
    """samples.jsonl rows: prompt, reference, and each side's reply (with whether its answer rule accepts it)."""
    samples = []
    for i, conversation in enumerate(conversations):
        rule = rules[i] if rules else None
        sample = {"prompt": message_text(conversation[-2]), "reference": message_text(conversation[-1]),
                  **({"answer_rule": rule} if rule else {})}
        for side, side_replies in replies.items():
            reply = side_replies[i]
            sample[side] = {"reply": reply.text, "finish_reason": reply.finish_reason, "new_tokens": reply.new_tokens,
                            **({"correct": retention.correct(rule, reply.text)} if rule else {})}
        samples.append(sample)
    return samples


@dataclass
class EvalArguments:
    adapter: str | None = field(default=None, metadata={"help": "A LoRA run directory (its base is read from it)."})
    model: str | None = field(default=None, metadata={"help": "A full model folder, or the base for --adapter."})
    data: str | None = field(default=None, metadata={
        "help": "Data file to evaluate on instead of the run's heldout.jsonl. Rows with an answer rule (\"any\": "
                "[...] or \"all\": [...] strings, as the retention probes) add answer_accuracy."})
    compare_base: bool = field(default=False, metadata={
        "help": "Also evaluate the base model, write a side-by-side, and check retention: did tuning keep what the "
                "base knew (general probes, and the loss rise on the base's own replies)?"})
    retention_data: str | None = field(default=None, metadata={
        "help": "With --compare_base: a data file (any supported format) whose conversations, without their last "
                "reply, replace the shipped general probes (loss rise only)."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Reply limit. Default: the run's (twice the p99 reply length of its training data, as its final "
                f"evaluation used); {DEFAULT_MAX_NEW_TOKENS} for a model folder."})
    batch_size: int = field(default=16, metadata={"help": "Conversations generated together."})
    tasks: str | None = field(default=None, metadata={
        "help": "lm-evaluation-harness tasks, comma-separated (mmlu, ceval-valid, cmmlu, or your own): scored on "
                "each side and added to the table (pip install 'sftlab[harness]')."})
    tasks_include: str | None = field(default=None, metadata={
        "help": "A folder of lm-eval task YAMLs (lm_eval --include_path): your own tasks, such as one on local "
                "files."})
    tasks_limit: int | None = field(default=None, metadata={
        "help": "At most this many examples per task (a quick check)."})
    num_fewshot: int | None = field(default=None, metadata={
        "help": "Few-shot examples per task prompt (default: each task's own)."})
    output: str | None = field(default=None, metadata={
        "help": "Output folder (default: RUN/eval, or RUN/eval/<data file stem> with --data)."})

    RANGES: ClassVar[dict] = {"max_new_tokens": Range(1, integer=True, nullable=True),
                              "batch_size": Range(1, integer=True),
                              "tasks_limit": Range(1, integer=True, nullable=True),
                              "num_fewshot": Range(0, integer=True, nullable=True)}

    def __post_init__(self):
        check_fields(self)
        if not (self.adapter or self.model):
            raise ValueError("pass --adapter RUN (a LoRA run) or --model PATH (a full model or run)")
        if self.compare_base and not self.adapter:
            raise ValueError("--compare_base needs --adapter (a full model has no separate base)")
        if self.retention_data and not self.compare_base:
            raise ValueError("--retention_data needs --compare_base (retention compares the tuned model with its "
                             "base)")
        if (self.tasks_include or self.tasks_limit or self.num_fewshot is not None) and not self.tasks:
            raise ValueError("--tasks_include, --tasks_limit and --num_fewshot need --tasks")


ARGUMENTS = (EvalArguments,)  # `sftlab eval`'s (cli.py parses them)


def run(args: EvalArguments) -> int:
    harness = None if not args.tasks else {
        "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()], "include_path": args.tasks_include,
        "limit": args.tasks_limit, "num_fewshot": args.num_fewshot, "batch_size": args.batch_size}
    if harness:
        from sftlab.eval.harness import check_tasks

        check_tasks(**harness)  # a misspelt task is one line before any model is loaded
    if args.output:  # before any model is loaded: an output folder that holds other files is refused
        check_output_folder(Path(args.output), "eval", ours=EVAL_FILES,
                            inputs=[p for p in (args.adapter, args.model, args.data, args.retention_data) if p])
    out = run_eval(args.model, args.adapter, args.data, args.compare_base, args.max_new_tokens, args.batch_size,
                   args.output, args.retention_data, harness)
    results = read_json(out / RESULTS)
    print(table_text(results))
    written = ", ".join(n for n in (REPORT, SAMPLES, RETENTION) if (out / n).exists())
    print(f"\nwrote {out}/{RESULTS}, {written}")
    run_dir = Path(args.adapter or args.model)
    finished_run = (run_dir / TRAINER_STATE).exists() and run_of_checkpoint(run_dir) is None
    if args.data is None and args.output is None and finished_run:  # a checkpoint's folder is left as committed
        write_run_report(run_dir)
    return 0
