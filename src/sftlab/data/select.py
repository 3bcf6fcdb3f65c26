"""`sftlab data select`: the rows worth training on, by the scores `sftlab data score` wrote.

The rows with the highest instruction-following difficulty (IFD) are kept among those not flagged misaligned:
Cherry LLM's selection, where the top 5-10% of Alpaca by IFD trained a better model than all of it. Every scored
row lands in selected.jsonl or unselected.jsonl, the latter with why; the report shows the IFD histogram with the
cut, rows on each side of it, and how the selection moved the reply lengths and the language mix."""

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from sftlab.config import Range, check_choices, check_fields
from sftlab.data.load import expand_inputs
from sftlab.data.prepare import source_digests
from sftlab.data.scorer import instruction_of, last_reply
from sftlab.data.sources import dataset_specs
from sftlab.errors import UserError
from sftlab.files import move_in
from sftlab.run_dir import check_output_folder

SELECT_OUTPUTS = ("selected.jsonl", "unselected.jsonl", "select_report.json", "report.md", "ifd.png")
SIDE_ROWS = 5  # rows shown on each side of the cut


@dataclass
class SelectArguments:
    scores: str = field(metadata={"help": "scores.jsonl of `sftlab data score` (read with its folder's "
                                          "score_report.json and cleaning/clean.jsonl)."})
    output: str = field(metadata={"help": "Folder for selected.jsonl (trainable as it is), unselected.jsonl (each "
                                          "row with why), select_report.json, report.md and ifd.png."})
    by: Literal["ifd"] = field(default="ifd", metadata={
        "help": "The score that ranks rows, highest first: ifd (the rows whose instruction helps their reply "
                "least, the hardest to follow)."})
    top: float | None = field(default=None, metadata={"help": "Keep this share of the scored rows (0.1: the top "
                                                              "tenth). Give --top or --keep."})
    keep: int | None = field(default=None, metadata={"help": "Keep this many rows. Give --top or --keep."})

    RANGES: ClassVar[dict] = {"top": Range(0, above=True, high=1, nullable=True),
                              "keep": Range(1, integer=True, nullable=True)}

    def __post_init__(self):
        check_choices(self)
        check_fields(self)
        if (self.top is None) == (self.keep is None):
            raise ValueError("give one of --top FRACTION and --keep N")


SELECT_ARGUMENTS = (SelectArguments,)  # `sftlab data select` (cli.py parses them)


def read_scores(path: Path) -> tuple[dict, dict[tuple[str, int], dict]]:
    """(score_report.json, scores by (file, line)) of a complete scoring, or one line saying what is wrong."""
    if path.is_dir():
        raise UserError(f"--scores {path} is a folder: give the scores.jsonl that `sftlab data score` wrote in it")
    if not path.is_file():
        raise UserError(f"--scores {path} does not exist: run `sftlab data score FILES... --output DIR` first")
    report_path = path.parent / "score_report.json"
    if not report_path.is_file():
        raise UserError(f"--scores {path}: its scoring is not complete (no score_report.json beside it): run "
                        "`sftlab data score` again")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    scores = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                scores[(record["file"], record["line"])] = record
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{path}:{number}: not a score record ({exc}): run `sftlab data score` again") \
                    from None
    return report, scores


def check_sources(sources: list[str], report: dict, scores_path: Path) -> None:
    """Every file to select from was scored, and has not changed since."""
    recorded = {str(Path(k).resolve()): v for k, v in report["sources"].items()}
    for source, digest in source_digests(sources).items():
        key = str(Path(source).resolve())
        if key not in recorded:
            raise UserError(f"{source} was not scored in {scores_path} (it scored {', '.join(report['sources'])}): "
                            "pass files it scored, or score this one")
        if recorded[key] != digest:
            raise UserError(f"{source} changed since it was scored in {scores_path}: score it again")


def kept_rows(folder: Path, scores: dict, sources: list[str]) -> list[dict]:
    """The cleaned rows of `sources`, each with its scores, in the order cleaning kept them."""
    wanted = {str(Path(s).resolve()) for s in sources}
    rows = []
    clean_file = folder / "cleaning" / "clean.jsonl"
    with open(clean_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{clean_file}:{number}: not a cleaned row ({exc}): run `sftlab data score` again") \
                    from None
            if str(Path(record["source"]).resolve()) not in wanted:
                continue
            score = scores.get((record["source"], record["line"]))
            if score is None:
                raise UserError(f"{folder}/scores.jsonl has no score for {record['source']}:{record['line']}, which "
                                "its cleaning kept: run `sftlab data score` again")
            rows.append({**record, "scores": {k: v for k, v in score.items() if k not in ("file", "line")}})
    return rows


def choose(rows: list[dict], args: SelectArguments, report: dict) -> tuple[list[dict], list[dict], float | None]:
    """(selected rows, unselected rows each with its reason, the cut: the lowest score kept)."""
    by = args.by
    eligible = sorted((r for r in rows if not r["scores"]["misaligned"] and r["scores"][by] is not None),
                      key=lambda r: (-r["scores"][by], r["source"], r["line"]))
    wanted = args.keep if args.keep is not None else math.ceil(args.top * len(rows))
    selected = eligible[:wanted]
    cut = selected[-1]["scores"][by] if selected else None
    chosen = {id(r) for r in selected}
    unselected = [{**r, "reason": reason(r, by, cut, report)} for r in rows if id(r) not in chosen]
    return selected, unselected, cut


def reason(row: dict, by: str, cut: float | None, report: dict) -> str:
    s, settings = row["scores"], report["settings"]
    if s["misaligned"]:
        tests = [f"ifd {s['ifd']:.3f} >= 1" if s["ifd"] is not None and s["ifd"] >= 1 else None,
                 f"relevance {s['relevance']:.3f} >= {settings['misaligned_relevance']:g}"
                 if s["relevance"] is not None and s["relevance"] >= settings["misaligned_relevance"] else None,
                 f"best_other_ratio {s['best_other_ratio']:.3f} >= {settings['misaligned_ratio']:g}"
                 if s["best_other_ratio"] is not None and s["best_other_ratio"] >= settings["misaligned_ratio"]
                 else None]
        return "misaligned: " + ", ".join(t for t in tests if t)
    if s[by] is None:
        return f"not scored: its reply has no token to score ({by} unknown)"
    if cut is not None and s[by] >= cut:
        return f"at the cut: {by} {s[by]:.4f} ties the last row kept, beyond the number asked for"
    return f"below the cut: {by} {s[by]:.4f} < {cut:.4f}" if cut is not None else "nothing was selected"


CJK = re.compile(r"[\u4e00-\u9fff]")


def mix(rows: list[dict]) -> dict:
    """Reply lengths and the language mix (a reply with any Chinese character counts as Chinese)."""
    if not rows:
        return {"rows": 0}
    tokens = sorted(r["scores"]["response_tokens"] for r in rows)
    chinese = sum(bool(CJK.search(last_reply(r["messages"])[1])) for r in rows)
    return {"rows": len(rows), "reply_tokens_mean": round(sum(tokens) / len(tokens), 1),
            "reply_tokens_median": tokens[len(tokens) // 2], "chinese_share": round(chinese / len(rows), 3),
            "multi_turn_share": round(sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1
                                          for r in rows) / len(rows), 3)}


def preview(row: dict, by: str) -> dict:
    history, reply = last_reply(row["messages"])
    return {"source": row["source"], "line": row["line"], by: row["scores"][by],
            "instruction": instruction_of(history)[:120], "reply": reply[:120]}


def select_report(rows, selected, unselected, cut, args: SelectArguments, scores_path: Path) -> dict:
    by = args.by
    ranked = sorted((r for r in unselected if not r["scores"]["misaligned"] and r["scores"][by] is not None),
                    key=lambda r: -r["scores"][by])
    reasons = {}
    for r in unselected:
        kind = r["reason"].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {"scores": str(scores_path), "by": by, "top": args.top, "keep": args.keep, "rows": len(rows),
            "selected": len(selected), "unselected": len(unselected), "unselected_by_reason": reasons, "cut": cut,
            "above_cut": [preview(r, by) for r in selected[-SIDE_ROWS:]],
            "below_cut": [preview(r, by) for r in ranked[:SIDE_ROWS]],
            "mix": {"all": mix(rows), "selected": mix(selected)}}


def plot_scores(rows: list[dict], by: str, cut: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    aligned = [r["scores"][by] for r in rows if r["scores"][by] is not None and not r["scores"]["misaligned"]]
    flagged = [r["scores"][by] for r in rows if r["scores"][by] is not None and r["scores"]["misaligned"]]
    ax.hist([aligned, flagged], bins=40, stacked=True, label=["scored", "misaligned (never selected)"])
    if cut is not None:
        ax.axvline(cut, color="black", linestyle="--", label=f"cut {cut:.3f}")
    ax.set_xlabel(by)
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(report: dict) -> str:
    by = report["by"]
    ask = f"top {report['top']:g}" if report["top"] is not None else f"keep {report['keep']}"
    cut = f"{report['cut']:.4f}" if report["cut"] is not None else "none"
    lines = [f"# Selection by {by} ({ask})", "",
             f"{report['selected']} of {report['rows']} scored rows selected; cut at {by} {cut}.", "",
             "![histogram](ifd.png)", "", "| not selected because | rows |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in report["unselected_by_reason"].items()]
    lines += ["", "| | rows | reply tokens (mean) | median | Chinese | multi-turn |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in report["mix"].items():
        if m["rows"]:
            lines.append(f"| {name} | {m['rows']} | {m['reply_tokens_mean']} | {m['reply_tokens_median']} | "
                         f"{m['chinese_share']:.0%} | {m['multi_turn_share']:.0%} |")
    for title, key in (("Last rows kept", "above_cut"), ("First rows below the cut", "below_cut")):
        lines += ["", f"## {title}", "", f"| {by} | row | instruction | reply |", "| ---: | --- | --- | --- |"]
        lines += [f"| {p[by]:.4f} | {Path(p['source']).name}:{p['line']} | {_cell(p['instruction'])} | "
                  f"{_cell(p['reply'])} |" for p in report[key]]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def select_data(args: SelectArguments, inputs: list[str]) -> int:
    scores_path = Path(args.scores)
    sources = [s for spec in dataset_specs(inputs) for s in expand_inputs([spec.path])]
    out = Path(args.output)
    check_output_folder(out, "data select", ours=SELECT_OUTPUTS, inputs=[*sources, str(scores_path)])
    report, scores = read_scores(scores_path)
    check_sources(sources, report, scores_path)
    rows = kept_rows(scores_path.parent, scores, sources)
    selected, unselected, cut = choose(rows, args, report)
    summary = select_report(rows, selected, unselected, cut, args, scores_path)
    staging = out.with_name(f".{out.name}.select.tmp")  # beside it: a crash leaves no half-written outputs there
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name, part in (("selected.jsonl", selected), ("unselected.jsonl", unselected)):
            with open(staging / name, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        plot_scores(rows, args.by, cut, staging / "ifd.png")
        (staging / "report.md").write_text(markdown(summary), encoding="utf-8")
        (staging / "select_report.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n",
                                                    encoding="utf-8")
        out.mkdir(parents=True, exist_ok=True)
        (out / "select_report.json").unlink(missing_ok=True)
        move_in(staging, out, last="select_report.json")  # the report last: with it, the outputs are complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"selected {len(selected)} of {len(rows)} rows by {args.by} (cut {cut if cut is None else round(cut, 4)}; "
          f"not selected: {', '.join(f'{k} {v}' for k, v in summary['unselected_by_reason'].items()) or 'none'})")
    print(f"wrote {out}/selected.jsonl, unselected.jsonl, select_report.json, report.md, ifd.png")
    return 0


def selected_files(data_args, clean_args, train_args, cached_only: bool = False) -> list[str]:
    """The training config's `select` section: its data scored and selected once, cached by the data's content,
    the scorer's weights and the settings; the selected rows' file, which the preparation then hashes like any
    data (so the prepared data changes with the scorer). The datasets' own options (columns, max_samples) apply
    before scoring; the selected rows are one dataset."""
    from sftlab.data.score import ScoreArguments, score_data
    from sftlab.environment import cache_root
    from sftlab.model.load import resolve_model_path, weights_digest

    sources = [s for spec in dataset_specs(data_args.data_files) for s in expand_inputs([spec.path])]
    settings = {"data_files": data_args.data_files, "sources": source_digests(sources),
                "scorer": weights_digest(resolve_model_path(train_args.select_scorer)),
                "by": train_args.select_by, "top": train_args.select_top, "keep": train_args.select_keep,
                "system_prompt": data_args.system_prompt, "seed": data_args.split_seed,
                "clean": json.dumps(clean_args.__dict__, sort_keys=True, default=str)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_root() / "select" / key
    selected = folder / "selection" / "selected.jsonl"
    specs = [spec if isinstance(spec, str) else json.dumps(spec) for spec in data_args.data_files]
    if not (folder / "selection" / "select_report.json").is_file():
        if cached_only:
            raise UserError(f"the data is not scored and selected for this run, and a multi-process run does not "
                            f"score it: run `sftlab data prepare` with the same config first (no {selected})")
        print(f"select: scoring {', '.join(map(str, data_args.data_files))} with {train_args.select_scorer} (once: "
              f"cached in {folder})", flush=True)
        score_data(ScoreArguments(output=str(folder / "scored"), scorer=train_args.select_scorer,
                                  system_prompt=data_args.system_prompt, seed=data_args.split_seed),
                   clean_args, specs)
        select_data(SelectArguments(scores=str(folder / "scored" / "scores.jsonl"), output=str(folder / "selection"),
                                    by=train_args.select_by, top=train_args.select_top, keep=train_args.select_keep),
                    specs)
    return [str(selected)]
