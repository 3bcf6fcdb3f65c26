"""The before/after tables of an evaluation: for the terminal, eval/report.md and the run report."""

from sftlab.eval.retention import retention_lines

# answer_accuracy: only for data whose rows carry answer rules (`any`/`all`, as the retention probes do)
# preference_accuracy, mean_margin, chosen_preferred: a DPO run's held-out pairs (eval/preference.py)
METRICS = ("preference_accuracy", "mean_margin", "chosen_preferred", "eval_loss", "perplexity", "rouge_1", "rouge_2",
           "rouge_l", "bleu_4", "answer_accuracy", "stop_rate", "mean_new_tokens")
SETTINGS = ("max_new_tokens", "n")  # shown beside the metrics: a stop rate means little without its limit
HIGHER_IS_BETTER = {"rouge_1", "rouge_2", "rouge_l", "bleu_4", "answer_accuracy", "stop_rate", "preference_accuracy",
                    "mean_margin", "chosen_preferred"}


SIDES = ("base", "tuned", "model")  # "model": a model folder evaluated on its own (eval --model)


def shown(results: dict, sides: list[str]) -> list[str]:
    """The metrics every side has, then lm-evaluation-harness scores ("task/metric"), then the settings."""
    tasks = [t for t in results[sides[0]].get("tasks", {}) if all(t in results[s].get("tasks", {}) for s in sides)]
    return [m for m in METRICS if all(m in results[side] for side in sides)] + tasks + list(SETTINGS)


def value(results: dict, side: str, metric: str):
    return results[side]["tasks"][metric] if "/" in metric else results[side].get(metric, "")


def higher_is_better(results: dict, metric: str) -> bool:
    return results.get("tasks_higher_is_better", {}).get(metric, True) if "/" in metric else metric in HIGHER_IS_BETTER


def comparison_markdown(results: dict, samples: list[dict], limit: int = 10) -> str:
    lines = ["# Evaluation", ""]
    sides = [side for side in SIDES if side in results]
    header = "| metric | " + " | ".join(sides) + (" | change |" if len(sides) == 2 else " |")
    lines += [header, "|" + " --- |" * (len(sides) + 1 + (len(sides) == 2))]
    for metric in shown(results, sides):
        values = [value(results, side, metric) for side in sides]
        row = f"| {metric} | " + " | ".join(str(v) for v in values)
        if len(sides) == 2 and metric not in SETTINGS:
            delta = values[1] - values[0]
            better = (delta > 0) == higher_is_better(results, metric) and delta != 0
            row += f" | {delta:+.4g}{' ✓' if better else ''}"
        lines.append(row + " |")
    if "retention" in results:
        lines += ["", "## Retention (general probes, base vs tuned)", "", "```", *retention_lines(results["retention"]),
                  "```"]
    lines += ["", f"## Replies (first {min(limit, len(samples))} of {len(samples)})", ""]
    for s in samples[:limit]:
        lines += [f"**Prompt:** {s['prompt']}", ""]
        for side in SIDES:
            if side in s:
                verdict = {True: ", right", False: ", wrong"}.get(s[side].get("correct"), "")
                lines.append(f"- {side} ({s[side]['finish_reason']}{verdict}): {s[side]['reply']}")
        lines += [f"- reference: {s['reference']}", ""]
    return "\n".join(lines) + "\n"


def markdown_cell(text: str, limit: int) -> str:
    """Text in one cell of a markdown table: its pipes escaped, on one line, at most `limit` characters."""
    return text.replace("|", "\\|").replace("\n", " ")[:limit]


def table_text(results: dict) -> str:
    """The before/after table for the terminal, and the retention verdict when there is one."""
    sides = [side for side in SIDES if side in results]
    metrics = shown(results, sides)
    width = max(16, *(len(m) + 1 for m in metrics))
    lines = [f"{'metric':{width}s}" + "".join(f"{side:>12s}" for side in sides)]
    for metric in metrics:
        lines.append(f"{metric:{width}s}" + "".join(f"{value(results, side, metric):>12}" for side in sides))
    if "retention" in results:
        lines += ["", *retention_lines(results["retention"])]
    return "\n".join(lines)
