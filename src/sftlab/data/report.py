"""The data report: counts per reason, token-length percentiles, a histogram, and a max_length suggestion.

Everything here is deterministic (no timestamps), so two runs over the same data write identical files."""

import json
import shutil
from pathlib import Path

from sftlab.data.clean import CleanResult, record_of
from sftlab.data.lengths import max_length_suggestion
from sftlab.files import move_in

NO_MODEL = "lengths are in characters: token counts and the too_long filter need --model PATH (the model you train)"


def template_system_prompt(result: CleanResult, default_system: str | None) -> dict | None:
    """The default system prompt the chat template writes into conversations without one, and how many kept rows
    it goes into (they are trained with it); None when the template has no default."""
    if default_system is None:
        return None
    return {"text": default_system, "rows": result.without_system}


def build_report(result: CleanResult, inputs: list[str], max_length: int | None, tokenizer_name: str | None,
                 default_system: str | None = None) -> dict:
    """The report. Lengths are in tokens of `tokenizer_name`'s tokenizer and template; without a model
    (tokenizer_name None) in characters, under "characters", with no max_length advice. `default_system`: the
    template's default system prompt (ChatRenderer.default_system), reported with the rows it goes into."""
    stats = result.lengths.stats()
    if result.unit == "characters":
        return {"inputs": inputs, "tokenizer": None, "note": NO_MODEL, "max_length": None,
                "rows_read": result.rows_read, "kept": result.kept_count, "rejected": result.rejected_count,
                "reasons": result.reasons(), "repairs": dict(sorted(result.repairs.items())),
                "formats": result.formats_by_file(), "characters": stats}
    return {
        "inputs": inputs,
        "tokenizer": tokenizer_name,
        "max_length": max_length,
        "rows_read": result.rows_read,
        "kept": result.kept_count,
        "rejected": result.rejected_count,
        "reasons": result.reasons(),
        "repairs": dict(sorted(result.repairs.items())),
        "formats": result.formats_by_file(),
        "tokens": stats,
        "max_length_suggestion": max_length_suggestion(result.lengths),
        **({"template_system_prompt": system} if (system := template_system_prompt(result, default_system)) else {}),
    }


def system_prompt_note(report: dict) -> str:
    """One sentence on the template's default system prompt, when it has one and rows get it; else ""."""
    system = report.get("template_system_prompt")
    if not system or not system["rows"]:
        return ""
    return (f"the chat template adds its default system prompt {system['text']!r} to the {system['rows']} kept rows "
            "without one, and they are trained with it (system_prompt: \"\" keeps it out, or give your own)")


def dataset_rows(per_dataset: dict[str, dict], result: CleanResult, train_rows: dict[str, int] | None = None
                 ) -> dict[str, dict]:
    """Per dataset: rows read, not sampled (max_samples), kept, rejected, weight and, for training, the training
    rows after weighting; `per_dataset` comes from sftlab.data.sources.read_datasets."""
    kept, rejected = result.kept_from, result.rejected_from
    table = {}
    for label, info in per_dataset.items():
        row = {"read": info["read"], "not_sampled": info["not_sampled"],
               "kept": sum(kept[s] for s in info["sources"]), "rejected": sum(rejected[s] for s in info["sources"]),
               "weight": info["weight"]}
        if train_rows is not None:
            row["train_rows"] = sum(train_rows.get(s, 0) for s in info["sources"])
        table[label] = row
    return table


def datasets_table(datasets: dict[str, dict]) -> list[str]:
    """Markdown lines: one row per dataset."""
    lines = ["| dataset | read | not sampled | kept | rejected | weight | training rows |", "| --- |" + " ---: |" * 6]
    return lines + [f"| {name} | {d['read']} | {d['not_sampled']} | {d['kept']} | {d['rejected']} | {d['weight']:g} | "
                    f"{d.get('train_rows', '-')} |" for name, d in datasets.items()]


def summary_line(report: dict) -> str:
    if report.get("kind") == "preference":
        from sftlab.data.preference import pair_summary

        return pair_summary(report)
    reasons = ", ".join(f"{k} {v}" for k, v in report["reasons"].items()) or "none"
    unit = "tokens" if "tokens" in report else "characters"
    total = report[unit]["total"]
    tokens = f"; {unit} p50 {total['p50']}, p99 {total['p99']}, max {total['max']}" if total.get("n") else ""
    # a forced data_format rejects the rows of other formats (mixed_format); auto reads each in its own
    how = ("the rows not in data_format's were rejected (mixed_format)" if "mixed_format" in report["reasons"]
           else "each row was read in its own format")
    mixed = "".join(f"; {Path(source).name} mixes formats ({', '.join(f'{k} {v}' for k, v in counts.items())}): "
                    f"{how}" for source, counts in report.get("formats", {}).items()
                    if len(counts) > 1)
    note = system_prompt_note(report)
    return (f"data: {report['rows_read']} rows read, {report['kept']} kept, {report['rejected']} rejected "
            f"({reasons}){tokens}{mixed}{'; ' + note if note else ''}")


def plot_lengths(result: CleanResult, max_length: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    unit = result.unit
    lengths = result.lengths
    series = {f"prompt {unit}": lengths.prompt, f"response {unit}": lengths.response, f"total {unit}": lengths.total}
    for ax, (title, counts) in zip(axes, series.items()):
        # each distinct length once, weighted by its rows: the histogram of every row's length
        values = sorted(counts) or [0]
        ax.hist(values, bins=50, weights=[counts[v] for v in values] if counts else None, color="#4C72B0")
        ax.set_title(title)
        ax.set_xlabel(unit)
        if max_length and title == "total tokens":
            if max_length <= 1.2 * max(values):  # far beyond the data, the line would squash the bars
                ax.axvline(max_length, color="#C44E52", linestyle="--", label=f"max_length {max_length}")
                ax.legend()
            else:
                ax.set_title(f"total tokens (all under max_length {max_length})")
    axes[0].set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: identical bytes on every run
    plt.close(fig)


def render_markdown(report: dict) -> str:
    unit = "tokens" if "tokens" in report else "characters"
    measured = (f"Tokenizer and template: {report['tokenizer']}, max_length {report['max_length']}"
                if unit == "tokens" else f"No model: {report['note']}")
    lines = ["# Data report", "", f"Inputs: {', '.join(report['inputs'])}  ", measured, "",
             f"**{report['rows_read']} rows read, {report['kept']} kept, {report['rejected']} rejected.**", "",
             "| reason | rows |", "| --- | ---: |"]
    lines += [f"| {reason} | {count} |" for reason, count in report["reasons"].items()] or ["| (none) | 0 |"]
    if report["repairs"]:
        lines += ["", "Repaired in place (kept): " + ", ".join(f"{k} {v}" for k, v in report["repairs"].items())]
    if system_prompt_note(report):
        lines += ["", "**System prompt**: " + system_prompt_note(report) + "."]
    if report.get("datasets"):
        lines += ["", "## Datasets", "", *datasets_table(report["datasets"])]
    lines += ["", f"## Lengths in {unit}", "", "| | mean | p50 | p90 | p95 | p99 | max |", "| --- |" + " ---: |" * 6]
    for name, stats in report[unit].items():
        if stats.get("n"):
            lines.append(f"| {name} | {stats['mean']} | {stats['p50']} | {stats['p90']} | {stats['p95']} | "
                         f"{stats['p99']} | {stats['max']} |")
    lines += ["", f"![lengths in {unit}](lengths.png)"]
    if unit == "characters":
        return "\n".join(lines) + "\n"
    lines += ["", "## Choosing max_length", "",
              "| max_length | samples lost | supervised tokens lost |", "| ---: | ---: | ---: |"]
    lines += [f"| {row['max_length']} | {row['samples_lost']:.2%} | {row['supervised_tokens_lost']:.2%} |"
              for row in report["max_length_suggestion"]]
    return "\n".join(lines) + "\n"


CLEAN_OUTPUTS = ("clean.jsonl", "rejected.jsonl", "report.json", "report.md", "lengths.png")  # data clean's files


class CleanFiles:
    """The outputs of `sftlab data clean`, written as the rows are decided (a sink for clean_rows): clean.jsonl
    and rejected.jsonl go to a staging folder, and `finish` adds the report and the plot and moves them all in,
    report.json last: a folder with report.json is complete. Use as a context manager: on an error the staging
    folder is removed and nothing is moved in."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.staging = self.out_dir.with_name(f".{self.out_dir.name}.clean.tmp")  # beside it: no output folder
        shutil.rmtree(self.staging, ignore_errors=True)                           # appears until it is complete
        self.staging.mkdir(parents=True)
        self.clean = open(self.staging / "clean.jsonl", "w", encoding="utf-8")
        self.rejects = open(self.staging / "rejected.jsonl", "w", encoding="utf-8")

    def kept(self, kept) -> None:
        record = kept.record_json or json.dumps(record_of(kept.messages, kept.tools), ensure_ascii=False)
        # the record's JSON with two more keys: what json.dumps of the whole dict writes, byte for byte
        self.clean.write(f'{record[:-1]}, "source": {json.dumps(kept.source, ensure_ascii=False)}, '
                         f'"line": {kept.line}}}\n')

    def rejected(self, r) -> None:
        self.rejects.write(json.dumps({"reason": r.reason, "source": r.source, "line": r.line, "detail": r.detail,
                                       "row": _truncate_row(r.row)}, ensure_ascii=False) + "\n")

    def finish(self, result: CleanResult, report: dict) -> None:
        self.clean.close()
        self.rejects.close()
        plot_lengths(result, report["max_length"], self.staging / "lengths.png")
        (self.staging / "report.md").write_text(render_markdown(report), encoding="utf-8")
        (self.staging / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n",
                                                  encoding="utf-8")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "report.json").unlink(missing_ok=True)
        move_in(self.staging, self.out_dir, last="report.json")  # the report last: with it, the outputs are complete

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.clean.close()
        self.rejects.close()
        shutil.rmtree(self.staging, ignore_errors=True)  # gone already after finish()


def write_clean_outputs(out_dir: Path, result: CleanResult, report: dict) -> None:
    """The outputs of a cleaning whose rows were collected in `result`."""
    with CleanFiles(out_dir) as files:
        for kept in result.kept:
            files.kept(kept)
        for rejected in result.rejected:
            files.rejected(rejected)
        files.finish(result, report)


def _truncate_row(row, limit: int = 10_000):
    """Rejected rows are kept for the user to look at, but a 10 MB row is cut to its first characters."""
    text = json.dumps(row, ensure_ascii=False)
    return row if len(text) <= limit else {"truncated_json": text[:limit]}


def replay_line(report: dict) -> str | None:
    """The data summary's replay line, or None without replay."""
    r = report.get("replay")
    if not r:
        return None
    short = f"; short by {r['short_by']}" if r.get("short_by") else ""
    return (f"replay: {r['kept']} rows of the base's own answers added to {r['task_train_rows']} training rows "
            f"(ratio {r['ratio']:g}; {r['stopped']} of {r['prompts']} replay prompts stopped, {r['not_stopped']} "
            f"did not and are left out{short}; never held out)")
