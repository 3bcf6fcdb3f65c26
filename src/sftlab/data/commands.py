"""`sftlab data clean` and `sftlab data inspect`: the cleaning stage on its own, and a look at a data file
as the model will see it."""

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sftlab.chat_format import ChatRenderer, mark_supervised
from sftlab.config import CleanArguments, Overflow, check_choices
from sftlab.data.cleaner import clean_rows
from sftlab.data.convert import detect_format
from sftlab.data.dedup import remove_store
from sftlab.data.load import expand_inputs
from sftlab.data.report import (
    CLEAN_OUTPUTS,
    NO_MODEL,
    CleanFiles,
    build_report,
    dataset_rows,
    summary_line,
    template_system_prompt,
)
from sftlab.data.sources import dataset_specs, iter_datasets, read_datasets
from sftlab.environment import TINY_MODEL_NAME
from sftlab.errors import interrupt_note
from sftlab.model.load import load_tokenizer, resolve_model_path
from sftlab.run_dir import check_output_folder


@dataclass
class RenderArguments:
    """How `data clean` and `data inspect` render rows: the model's tokenizer and template, and the limit."""

    model: str | None = field(
        default=None,
        metadata={"help": "The model you will train (folder, Hub id or sftlab:tiny-glm4): its tokenizer and chat "
                  "template measure lengths in tokens and apply max_length. Without it, data clean reports lengths "
                  "in characters and applies no length filter; data inspect renders with the tiny GLM-4."},
    )
    max_length: int = field(default=512, metadata={"help": "Token limit (template included)."})
    overflow: Overflow = field(
        default="drop", metadata={"help": "Samples over max_length: drop, or truncate keeping part of the answer."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message for rows without one (unset: none; \"\": an empty one, which "
                                "keeps a chat template's default system prompt out)."})

    def __post_init__(self):
        check_choices(self)


@dataclass
class CleanOutput:
    output: str = field(metadata={"help": "Folder for clean.jsonl, rejected.jsonl, report.json/.md."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the rows a dataset's max_samples keeps (train "
                                                          "draws them with its split_seed, this same field)."})


@dataclass
class InspectArguments:
    num_records: int = field(default=3, metadata={"help": "Records to render.", "aliases": ["-n"]})


CLEAN_ARGUMENTS = (CleanOutput, RenderArguments, CleanArguments)  # `sftlab data clean` (cli.py parses them)
INSPECT_ARGUMENTS = (InspectArguments, RenderArguments)  # `sftlab data inspect`


def renderer_for(args: RenderArguments) -> ChatRenderer:
    tokenizer = load_tokenizer(resolve_model_path(args.model or TINY_MODEL_NAME))
    return ChatRenderer(tokenizer, args.max_length, args.overflow)


def clean_data(output: CleanOutput, render: RenderArguments, config: CleanArguments, inputs: list[str]) -> int:
    """Streams: rows are read, checked, decided and written a batch at a time, with the duplicate state on disk
    (in the staging folder), so memory does not grow with the number of rows."""
    per_dataset = {}
    specs = dataset_specs(inputs)
    check_output_folder(Path(output.output), "data clean", ours=CLEAN_OUTPUTS,
                        inputs=[source for spec in specs for source in expand_inputs([spec.path])])
    rows = iter_datasets(specs, output.split_seed, per_dataset, config.max_row_bytes)
    renderer = renderer_for(render) if render.model else None
    if renderer is None:
        print(f"note: {NO_MODEL}")
    note = f"nothing was written to {output.output}; run the same command again"
    with interrupt_note(lambda: note), CleanFiles(Path(output.output)) as files:
        checked = None
        if config.datatrove_tasks:
            checked, per_dataset = checked_on_datatrove(files.staging, inputs, config, render, output.split_seed)
        result = clean_rows(rows, config, renderer, render.system_prompt, enabled=config.clean, progress=True,
                            sink=files, work_dir=files.staging, checked=checked)
        shutil.rmtree(files.staging / "checked", ignore_errors=True)
        shutil.rmtree(files.staging / "datatrove-logs", ignore_errors=True)
        remove_store(files.staging)
        sources = [source for info in per_dataset.values() for source in info["sources"]]
        report = build_report(result, sources, render.max_length, render.model,
                              renderer.default_system if renderer is not None else None)
        report["datasets"] = dataset_rows(per_dataset, result)
        files.finish(result, report)
    print(summary_line(report))
    print(f"wrote {output.output}/clean.jsonl, rejected.jsonl, report.json, report.md, lengths.png")
    return 0


def checked_on_datatrove(folder: Path, inputs: list[str], config: CleanArguments, render: RenderArguments,
                         split_seed: int):
    """The rows checked by datatrove tasks (sftlab.data.pipeline, stage 1), as batches in order, and the datasets'
    counts."""
    from sftlab.data import pipeline

    steps = pipeline.check_steps(inputs, folder, config, render.model, render.max_length, render.overflow,
                                 render.system_prompt, split_seed)
    pipeline.run_locally(steps, folder, config.datatrove_tasks, config.num_proc)
    return pipeline.checked_batches(folder, config.datatrove_tasks), pipeline.dataset_counts(folder)


def schema(rows) -> dict[str, Counter]:
    """Field -> counts of its JSON types, over all rows."""
    types = {}
    for source_row in rows:
        if isinstance(source_row.row, dict):
            for key, value in source_row.row.items():
                types.setdefault(key, Counter())[type(value).__name__] += 1
    return types


def inspect_pairs(inspect: InspectArguments, args: RenderArguments, file: str, rows: list) -> int:
    """`sftlab data inspect` on preference pairs (what `sftlab dpo` reads): the pair report, and the first pairs as
    DPO sees them: the prompt, then «each reply» (the tokens the loss is taken on)."""
    from sftlab.data.preference import prepare_pairs

    renderer = renderer_for(args)
    data = prepare_pairs(iter(rows), renderer, args.system_prompt, 0.0, 0)
    print(f"file: {file}\n{data.summary()}\nschema:")
    for key, counts in schema(rows).items():
        print(f"  {key}: {', '.join(f'{t} x{n}' for t, n in counts.most_common())}")
    decode = renderer.tokenizer.decode
    print(f"\nfirst {min(inspect.num_records, len(data.train))} pairs as `sftlab dpo` sees them (the prompt, then "
          "«each reply»):")
    for pair in data.train[:inspect.num_records]:
        print(f"\n--- prompt ({len(pair['prompt_ids'])} tokens)\n{decode(pair['prompt_ids'])}")
        for side in ("chosen", "rejected"):
            ids = pair[f"{side}_ids"]
            print(f"{side} ({len(ids)} tokens): «{decode(ids)}»")
    for rejected in data.rejected[:inspect.num_records]:
        print(f"\n--- {rejected['source']}:{rejected['line']}: not usable: {rejected['reason']}: {rejected['detail']}")
    return 0


def inspect_data(inspect: InspectArguments, args: RenderArguments, file: str) -> int:
    rows, _ = read_datasets(dataset_specs([file]), seed=0)  # as training reads a dataset: columns, max_samples
    pairs = sum(isinstance(r.row, dict) and "chosen" in r.row and "rejected" in r.row for r in rows)
    if pairs * 2 > len(rows):
        return inspect_pairs(inspect, args, file, rows)
    formats = Counter(detect_format(r.row) for r in rows if r.error is None)
    renderer = renderer_for(args)
    result = clean_rows(rows, CleanArguments(near_dedup=False), renderer, args.system_prompt, enabled=False)
    print(f"file: {file}")
    detected = ", ".join(f"{name or 'unknown'} ({count} rows)" for name, count in formats.most_common())
    print(f"format: {detected}")
    print(f"rows: {len(rows)}  (renderable: {len(result.kept)}, not: {len(result.rejected)})")
    print("schema:")
    for key, counts in schema(rows).items():
        print(f"  {key}: {', '.join(f'{t} x{n}' for t, n in counts.most_common())}")
    print(f"\nfirst {min(inspect.num_records, len(result.kept))} records as the model sees them "
          f"(«supervised tokens» are trained on):")
    for kept in result.kept[:inspect.num_records]:
        print(f"\n--- {kept.source}:{kept.line} ({len(kept.sample.input_ids)} tokens, "
              f"{kept.sample.num_supervised} supervised)")
        print(mark_supervised(renderer.tokenizer, kept.sample))
    for rejected in result.rejected[:inspect.num_records]:
        print(f"\n--- {rejected.source}:{rejected.line}: not usable: {rejected.reason}: {rejected.detail}")
    system = template_system_prompt(result, renderer.default_system)
    if system is not None:
        print(f"\nsystem prompt: the chat template adds its default {system['text']!r} to every conversation "
              f"without a system message ({system['rows']} of {len(result.kept)} here); --system_prompt \"\" keeps it "
              "out, or give your own")
    if args.model is None:
        print(f"\nnote: rendered with {TINY_MODEL_NAME}, whose tokenizer is not your model's: pass --model PATH "
              "for its real token counts")
    print(f"\ntokens ({args.model or TINY_MODEL_NAME}, max_length {args.max_length}):")
    for name, stats in result.lengths.stats().items():
        print(f"  {name:8s} {json.dumps(stats)}")
    return 0
