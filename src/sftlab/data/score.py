"""`sftlab data score`: the cleaning stage with the scorer's tokenizer (every rejected row counted), then every
kept row scored by the scorer (sftlab.data.scorer: IFD, relevance, the best-other ratio, the misaligned flag), a
shard of rows at a time, each committed as it is done, so an interrupted run goes on from its first uncommitted
shard; scores.jsonl and score_report.json appear only when every row is scored."""

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tqdm.auto import tqdm

from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments, Range, check_fields
from sftlab.data.load import expand_inputs
from sftlab.data.prepare import source_digests
from sftlab.data.scorer import Pool, ScoreSettings, instruction_of, last_reply, score_batch, score_inputs
from sftlab.errors import interrupt_note
from sftlab.files import file_digest, write_atomic
from sftlab.model.load import (
    best_device_and_dtype,
    load_model,
    load_tokenizer,
    resolve_model_path,
    weights_digest,
    with_system_prompt,
)
from sftlab.run_dir import check_output_folder

SHARDS = ".score-shards"  # committed shards of an unfinished scoring, by the key of its data and settings
SCORE_OUTPUTS = ("cleaning", "scores.jsonl", "score_report.json", SHARDS)


@dataclass
class ScoreArguments:
    output: str = field(metadata={"help": "Folder for scores.jsonl (one record per kept row) and score_report.json; "
                                          "the cleaning they are built on goes to its cleaning/ folder."})
    scorer: str = field(default="sftlab:smollm2-135m", metadata={
        "help": "The model that scores (folder, Hub id, or sftlab:smollm2-135m): a small one scores for a large one "
                "as well as the large one does (Superfiltering), many times faster."})
    max_length: int = field(default=2048, metadata={"help": "Token limit of a row rendered with the scorer's "
                                                            "template; cleaning rejects longer rows, counted."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System message for rows without one (unset: the scorer's template decides; \"\": an empty one)."})
    others: int = field(default=2, metadata={"help": "Instructions drawn at random from the pool and tried on each "
                                                     "reply (each one is a forward pass a row): its relevance."})
    likest: int = field(default=3, metadata={"help": "Instructions of the pool rows likest the reply (by shared "
                                                     "character pairs) tried on it: its best-other ratio."})
    pool_rows: int = field(default=2000, metadata={"help": "Rows (a seeded sample of the data, all of it when it "
                                                           "is smaller) whose instructions are the others tried."})
    misaligned_relevance: float = field(default=1.05, metadata={
        "help": "A row whose reply is no likelier under its own instruction than under random others (its loss "
                "over their mean at or over this) is misaligned."})
    misaligned_ratio: float = field(default=1.08, metadata={
        "help": "A row whose reply is likelier under another instruction of the pool (its loss over the lowest "
                "other loss at or over this) is misaligned."})
    max_tokens_per_batch: int = field(default=4096, metadata={"help": "Tokens in one padded forward pass."})
    shard_rows: int = field(default=64, metadata={"help": "Rows scored and committed together: an interrupted run "
                                                           "run again starts at its first uncommitted shard."})
    dtype: str = field(default="auto", metadata={"help": "Scorer dtype: auto (bf16 on a GPU that has it, else "
                                                         "float32), float32, bfloat16, float16."})
    seed: int = field(default=42, metadata={"help": "Seed of the pool, the others drawn, and max_samples."})

    RANGES: ClassVar[dict] = {"others": Range(0, integer=True), "likest": Range(0, integer=True),
                              "pool_rows": Range(1, integer=True), "max_length": Range(1, integer=True),
                              "misaligned_relevance": Range(0, above=True), "misaligned_ratio": Range(0, above=True),
                              "max_tokens_per_batch": Range(1, integer=True), "shard_rows": Range(1, integer=True)}

    def __post_init__(self):
        check_fields(self)


SCORE_ARGUMENTS = (ScoreArguments, CleanArguments)  # `sftlab data score` (cli.py parses them)


def read_records(path: Path, wanted: set[int] | None = None) -> Iterator[tuple[int, dict]]:
    """(index, record) of clean.jsonl's rows, or of those whose index is in `wanted`."""
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if wanted is None or index in wanted:
                yield index, json.loads(line)


def scored_rows(renderer: ChatRenderer, records, system_prompt: str | None):
    for index, record in records:
        history, reply = last_reply(with_system_prompt(record["messages"], system_prompt))
        yield (index, score_inputs(renderer, history, reply, record.get("tools")), instruction_of(history), reply), \
            record


def build_pool(path: Path, rows: int, renderer: ChatRenderer, args: ScoreArguments) -> Pool:
    chosen = set(random.Random(f"{args.seed}:pool").sample(range(rows), min(rows, args.pool_rows)))
    prompts, instructions, replies = {}, {}, {}
    for (index, inputs, instruction, reply), _ in scored_rows(renderer, read_records(path, chosen),
                                                             args.system_prompt):
        prompts[index], instructions[index], replies[index] = inputs.prompt_ids, instruction, reply
    return Pool(prompts, instructions, replies)


def shards_key(clean_file: Path, scorer_path: Path, args: ScoreArguments) -> str:
    names = ("others", "likest", "pool_rows", "misaligned_relevance", "misaligned_ratio", "shard_rows", "seed",
             "system_prompt", "dtype")
    settings = {k: getattr(args, k) for k in names}
    text = json.dumps([file_digest(clean_file), weights_digest(scorer_path), settings], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def score_data(args: ScoreArguments, clean: CleanArguments, inputs: list[str]) -> int:
    from sftlab.data.commands import CleanOutput, RenderArguments, clean_data
    from sftlab.data.sources import dataset_specs

    out = Path(args.output)
    sources = [s for spec in dataset_specs(inputs) for s in expand_inputs([spec.path])]
    check_output_folder(out, "data score", ours=SCORE_OUTPUTS, inputs=sources)
    scorer_path = resolve_model_path(args.scorer)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("score_report.json", "scores.jsonl"):  # what a previous scoring left is replaced, never mixed
        (out / name).unlink(missing_ok=True)
    clean_data(CleanOutput(str(out / "cleaning"), args.seed),
               RenderArguments(args.scorer, args.max_length, "drop", args.system_prompt), clean, inputs)
    clean_file = out / "cleaning" / "clean.jsonl"
    rows = json.loads((out / "cleaning" / "report.json").read_text(encoding="utf-8"))["kept"]
    key = shards_key(clean_file, scorer_path, args)
    shards = out / SHARDS / key
    for stale in (out / SHARDS).glob("*"):  # shards of other data or settings: nothing to resume there
        if stale.name != key:
            shutil.rmtree(stale, ignore_errors=True)
    shards.mkdir(parents=True, exist_ok=True)
    renderer = ChatRenderer(load_tokenizer(scorer_path))
    settings = ScoreSettings(args.others, args.likest, args.seed, args.misaligned_relevance, args.misaligned_ratio,
                             args.max_tokens_per_batch)
    started, scored_now = time.perf_counter(), 0
    with interrupt_note(lambda: f"the shards scored so far are kept in {shards}; run the same command again to "
                                "go on from there"):
        pool = build_pool(clean_file, rows, renderer, args) if rows else Pool({}, {}, {})
        model = None
        bar = tqdm(total=rows, unit="row", desc="scoring", dynamic_ncols=True)
        records = scored_rows(renderer, read_records(clean_file), args.system_prompt)
        for number in range(math.ceil(rows / args.shard_rows)):
            batch = list(itertools.islice(records, args.shard_rows))
            shard = shards / f"{number:05d}.jsonl"
            if not shard.is_file():
                if model is None:
                    model = scorer_model(scorer_path, args.dtype)
                scores = score_batch(model, renderer, [row for row, _ in batch], pool, settings)
                write_atomic(shard, "".join(json.dumps({"file": record["source"], "line": record["line"], **s},
                                                       ensure_ascii=False) + "\n"
                                            for (_, record), s in zip(batch, scores)))
                scored_now += len(batch)
            bar.update(len(batch))
        bar.close()
    seconds = time.perf_counter() - started
    report = finish_scores(out, shards, rows, args, scored_now, seconds, sources)
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    print(score_line(report))
    print(f"wrote {out}/scores.jsonl, score_report.json (and the cleaning it is built on in {out}/cleaning/)")
    return 0


def scorer_model(path: Path, dtype: str):
    device, auto_dtype = best_device_and_dtype()
    model = load_model(path, auto_dtype if dtype == "auto" else dtype, device=device)
    model.eval()
    return model


def quantiles(values: list[float]) -> dict:
    values = sorted(values)
    return {f"p{q}": round(values[min(len(values) - 1, int(q / 100 * len(values)))], 4)
            for q in (5, 25, 50, 75, 95)} if values else {}


def finish_scores(out: Path, shards: Path, rows: int, args: ScoreArguments, scored_now: int, seconds: float,
                  sources: list[str]) -> dict:
    """scores.jsonl from the shards (written whole, then renamed), and score_report.json last: a folder with it is
    complete."""
    tests = {"ifd >= 1": ("ifd", 1.0), f"relevance >= {args.misaligned_relevance:g}":
             ("relevance", args.misaligned_relevance), f"best_other_ratio >= {args.misaligned_ratio:g}":
             ("best_other_ratio", args.misaligned_ratio)}
    counts, ifds, flagged, written = Counter(), [], 0, 0
    tmp = out / "scores.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as target:  # streamed: a million rows are not held in memory
        for part in sorted(shards.glob("*.jsonl")):
            with open(part, encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line)
                    target.write(line)
                    written += 1
                    flagged += record["misaligned"]
                    counts.update(name for name, (key, bound) in tests.items()
                                  if record[key] is not None and record[key] >= bound)
                    if record["ifd"] is not None:
                        ifds.append(record["ifd"])
    if written != rows:
        tmp.unlink()
        raise RuntimeError(f"{shards} holds {written} scored rows, not the {rows} kept: run again")
    os.replace(tmp, out / "scores.jsonl")
    report = {
        "scorer": args.scorer, "rows": rows, "misaligned": flagged,
        "misaligned_by": {name: counts[name] for name in tests},
        "not_scored": rows - len(ifds),
        "ifd": quantiles(ifds),
        "scored_this_run": scored_now, "seconds": round(seconds, 1),
        "rows_per_second": round(scored_now / seconds, 2) if scored_now and seconds else None,
        "settings": {k: getattr(args, k) for k in ("others", "likest", "pool_rows", "misaligned_relevance",
                                                   "misaligned_ratio", "max_length", "system_prompt", "seed")},
        "sources": source_digests(sources),
        "multi_turn": "the last assistant reply of a row is scored, given every message before it",
    }
    write_atomic(out / "score_report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    return report


def score_line(report: dict) -> str:
    ifd = report["ifd"]
    speed = f"; {report['rows_per_second']} rows/s" if report["rows_per_second"] else ""
    return (f"scored {report['rows']} rows with {report['scorer']}: ifd median {ifd.get('p50', '-')} (p5 "
            f"{ifd.get('p5', '-')}, p95 {ifd.get('p95', '-')}); {report['misaligned']} misaligned "
            f"({', '.join(f'{k}: {v}' for k, v in report['misaligned_by'].items())}); {report['not_scored']} not "
            f"scored (a reply with no token to score){speed}")
