"""`sftlab data clean` and `sftlab data inspect`: the cleaning stage on its own, and a look at a data file
as the model will see it."""

import argparse
import json
from collections import Counter
from dataclasses import fields
from pathlib import Path

import yaml

from sftlab.chat_format import ChatRenderer, mark_supervised
from sftlab.config import CleanArguments
from sftlab.data.clean import clean_rows
from sftlab.data.convert import detect_format
from sftlab.data.load import expand_inputs, read_source
from sftlab.data.prepare import read_all
from sftlab.data.report import build_report, length_stats, summary_line, write_clean_outputs
from sftlab.errors import UserError
from sftlab.model.load import load_tokenizer, resolve_model_path
from sftlab.environment import TINY_MODEL_NAME


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=TINY_MODEL_NAME,
                        help="Model whose tokenizer and chat template measure lengths (default: the tiny GLM-4, "
                             "whose tokenizer is not GLM-4-9B's: pass ./weights/glm-4-9b-hf for real counts).")
    parser.add_argument("--max_length", type=int, default=512, help="Token limit (template included).")
    parser.add_argument("--overflow", choices=["drop", "truncate"], default="drop",
                        help="Samples over max_length: drop, or truncate keeping part of the answer.")
    parser.add_argument("--system_prompt", help="System message for rows without one.")


def clean_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftlab data clean", description="Clean data files and report what was wrong.")
    p.add_argument("inputs", nargs="+", help="Files (.json .jsonl .parquet .csv), globs, or a Hub dataset id.")
    p.add_argument("--output", required=True, help="Folder for clean.jsonl, rejected.jsonl, report.json/.md.")
    p.add_argument("--config", help="YAML with cleaning fields (as below); flags win.")
    add_common(p)
    for f in fields(CleanArguments):
        if f.name == "clean":
            continue
        help_text = f.metadata.get("help", "")
        if f.type == bool or f.type == "bool":
            p.add_argument(f"--{f.name}", type=_bool, default=None, help=help_text)
        elif f.name == "boilerplate":
            p.add_argument("--boilerplate", nargs="*", default=None, help=help_text)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=None, help=help_text)
    p.add_argument("--format", dest="data_format", default=None, help="Alias of --data_format.")
    return p


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def clean_args_from(args) -> CleanArguments:
    values = {}
    if args.config:
        if not Path(args.config).is_file():
            raise UserError(f"config file {args.config} does not exist")
        values = yaml.safe_load(Path(args.config).read_text()) or {}
        known = {f.name for f in fields(CleanArguments)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{args.config}: unknown config key(s): {', '.join(unknown)}")
    values.update({f.name: getattr(args, f.name) for f in fields(CleanArguments)
                   if getattr(args, f.name, None) is not None})
    try:
        return CleanArguments(**values)
    except ValueError as exc:
        raise UserError(str(exc))


def renderer_for(args) -> ChatRenderer:
    tokenizer = load_tokenizer(resolve_model_path(args.model))
    return ChatRenderer(tokenizer, args.max_length, args.overflow)


def clean_main(argv: list[str]) -> int:
    args = clean_parser().parse_args(argv)
    config = clean_args_from(args)
    sources = expand_inputs(args.inputs)
    renderer = renderer_for(args)
    result = clean_rows(read_all(sources), config, renderer, args.system_prompt, progress=True)
    report = build_report(result, sources, args.max_length, args.model)
    write_clean_outputs(Path(args.output), result, report)
    print(summary_line(report))
    print(f"wrote {args.output}/clean.jsonl, rejected.jsonl, report.json, report.md, lengths.png")
    return 0


def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftlab data inspect",
                                description="Show a data file as the model will see it.")
    p.add_argument("file", help="A data file (.json .jsonl .parquet .csv).")
    p.add_argument("-n", "--num_records", type=int, default=3, help="Records to render.")
    add_common(p)
    return p


def schema(rows) -> dict[str, Counter]:
    """Field -> counts of its JSON types, over all rows."""
    types = {}
    for source_row in rows:
        if isinstance(source_row.row, dict):
            for key, value in source_row.row.items():
                types.setdefault(key, Counter())[type(value).__name__] += 1
    return types


def inspect_main(argv: list[str]) -> int:
    args = inspect_parser().parse_args(argv)
    sources = expand_inputs([args.file])
    rows = [row for source in sources for row in read_source(source)]
    formats = Counter(detect_format(r.row) for r in rows if r.error is None)
    renderer = renderer_for(args)
    result = clean_rows(rows, CleanArguments(near_dedup=False), renderer, args.system_prompt, enabled=False)
    print(f"file: {args.file}")
    detected = ", ".join(f"{name or 'unknown'} ({count} rows)" for name, count in formats.most_common())
    print(f"format: {detected}")
    print(f"rows: {len(rows)}  (renderable: {len(result.kept)}, not: {len(result.rejected)})")
    print("schema:")
    for key, counts in schema(rows).items():
        print(f"  {key}: {', '.join(f'{t} x{n}' for t, n in counts.most_common())}")
    print(f"\nfirst {min(args.num_records, len(result.kept))} records as the model sees them "
          f"(«supervised tokens» are trained on):")
    for kept in result.kept[:args.num_records]:
        print(f"\n--- {kept.source}:{kept.line} ({len(kept.sample.input_ids)} tokens, "
              f"{kept.sample.num_supervised} supervised)")
        print(mark_supervised(renderer.tokenizer, kept.sample))
    for rejected in result.rejected[:args.num_records]:
        print(f"\n--- {rejected.source}:{rejected.line}: not usable: {rejected.reason}: {rejected.detail}")
    print(f"\ntokens ({args.model}, max_length {args.max_length}):")
    for name, values in (("prompt", [p for p, _ in result.lengths]), ("response", [r for _, r in result.lengths]),
                         ("total", [p + r for p, r in result.lengths])):
        print(f"  {name:8s} {json.dumps(length_stats(values))}")
    return 0
