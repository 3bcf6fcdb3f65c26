"""The before/after tables of an evaluation: for the terminal, eval/report.md and the run report."""

from sftlab.eval.retention import retention_lines

METRICS = ("eval_loss", "perplexity", "rouge_1", "rouge_2", "rouge_l", "bleu_4", "stop_rate", "mean_new_tokens")
SETTINGS = ("max_new_tokens", "n")  # shown beside the metrics: a stop rate means little without its limit
HIGHER_IS_BETTER = {"rouge_1", "rouge_2", "rouge_l", "bleu_4", "stop_rate"}


SIDES = ("base", "tuned", "model")  # "model": a model folder evaluated on its own (eval --model)


def comparison_markdown(results: dict, samples: list[dict], limit: int = 10) -> str:
    lines = ["# Evaluation", ""]
    sides = [side for side in SIDES if side in results]
    header = "| metric | " + " | ".join(sides) + (" | change |" if len(sides) == 2 else " |")
    lines += [header, "|" + " --- |" * (len(sides) + 1 + (len(sides) == 2))]
    for metric in METRICS + SETTINGS:
        values = [results[side].get(metric, "") for side in sides]
        row = f"| {metric} | " + " | ".join(str(v) for v in values)
        if len(sides) == 2 and metric not in SETTINGS:
            delta = values[1] - values[0]
            better = (delta > 0) == (metric in HIGHER_IS_BETTER) and delta != 0
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
                lines.append(f"- {side} ({s[side]['finish_reason']}): {s[side]['reply']}")
        lines += [f"- reference: {s['reference']}", ""]
    return "\n".join(lines) + "\n"


def table_text(results: dict) -> str:
    """The before/after table for the terminal, and the retention verdict when there is one."""
    sides = [side for side in SIDES if side in results]
    lines = [f"{'metric':16s}" + "".join(f"{side:>12s}" for side in sides)]
    for metric in METRICS + SETTINGS:
        lines.append(f"{metric:16s}" + "".join(f"{results[side].get(metric, ''):>12}" for side in sides))
    if "retention" in results:
        lines += ["", *retention_lines(results["retention"])]
    return "\n".join(lines)
