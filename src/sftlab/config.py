"""Configuration dataclasses shared by the verbs. Field names follow TRL's ModelConfig where they overlap,
so the tutorial's YAML files keep working. The training config (SFTConfig subclass) lives in train/sft.py:
train/ is the only package that imports trl."""

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Literal, get_args, get_origin

import yaml

from sftlab.environment import TINY_MODEL_NAME
from sftlab.errors import UserError
from sftlab.files import load_yaml, yaml_key_lines
from sftlab.internals import parser_fields

# Each choice is declared once, as the field's type: the parser lists it, check_choices enforces it (YAML
# values become parser defaults, which argparse does not check against its choices).
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Overflow = Literal["drop", "truncate"]


def check_choices(config) -> None:
    """Raises ValueError naming the field and its allowed values for a value outside a Literal field's."""
    for f in fields(config):
        if get_origin(f.type) is Literal and getattr(config, f.name) not in get_args(f.type):
            allowed = ", ".join(get_args(f.type))
            raise ValueError(f"{f.name}: {getattr(config, f.name)!r} is not one of {allowed}")


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts, declared once in its dataclass's RANGES (a ClassVar beside the fields: the
    argument parsers pass field metadata on to argparse); check_fields enforces them with one line naming the
    field, what it must be and what it got."""

    low: float
    above: bool = False  # > low, not >= low
    high: float | None = None
    below: bool = False  # < high, not <= high
    integer: bool = False
    nullable: bool = False
    also: tuple = ()  # values accepted besides the range (max_steps: -1)
    note: str = ""  # after the rule, e.g. "(0 is greedy)"
    say: str = ""  # the whole rule, where the generated one would not say it well

    def accepts(self, value) -> bool:
        if value is None:
            return self.nullable
        if value in self.also and not isinstance(value, bool):
            return True
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value) or value < self.low or (self.above and value == self.low):
            return False
        return self.high is None or value < self.high or (value == self.high and not self.below)

    def text(self) -> str:
        if self.say:
            return self.say
        if self.high is not None:
            rule = f"in {'(' if self.above else '['}{self.low:g}, {self.high:g}{')' if self.below else ']'}"
        elif self.integer:
            rule = f"an integer {'>' if self.above else '>='} {self.low:g}"
        else:
            rule = "a positive number" if (self.low, self.above) == (0, True) else \
                f"a number {'>' if self.above else '>='} {self.low:g}"
        return rule + (f" {self.note}" if self.note else "") + (", or null" if self.nullable else "")


def check_fields(config) -> None:
    """Every range the config's class declares (RANGES) and every Literal choice: a ValueError naming the first
    field outside its own."""
    check_choices(config)
    for name, declared in getattr(type(config), "RANGES", {}).items():
        if not declared.accepts(getattr(config, name)):
            raise ValueError(f"{name}: must be {declared.text()}, got {getattr(config, name)!r}")


def read_config_file(argv: list[str]) -> tuple[str, dict] | None:
    """(path, values) of `--config FILE.yaml` in argv, or None; a missing file or a YAML that is not a mapping
    of field: value is one line (shared by every verb's parser)."""
    if "--config" not in argv:
        return None
    at = argv.index("--config")
    path = argv[at + 1] if at + 1 < len(argv) else ""
    if not Path(path).is_file():
        raise UserError(f"config file {path or '(missing)'} does not exist")
    try:
        values = load_yaml(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        tab = " (YAML does not allow tabs for indentation: use spaces)" if "'\\t'" in problem else ""
        raise UserError(f"config file {path}{where}: not valid YAML: {problem}{tab}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path}: not UTF-8 text (invalid byte at {exc.start})") from None
    if values is None:
        raise UserError(f"config file {path} is empty: give it field: value lines (or leave --config out)")
    if not isinstance(values, dict):
        raise UserError(f"config file {path}: expected a mapping of field: value, got a {type(values).__name__}")
    return path, values


def parse_verb(prog: str, types: tuple, argv: list[str], parser_class=None, positional: tuple = ()) -> tuple:
    """Every verb's arguments, parsed one way: dataclasses with help text on every field (transformers'
    HfArgumentParser; train and estimate pass TRL's TrlParser), `--config FILE.yaml` first and flags winning, the
    file's `env:` mapping set as environment variables (TrlParser's convention), each flag spelt with underscores
    or dashes. `positional`: (name, add_argument kwargs) pairs, returned last as a namespace. An unknown key or flag
    and a bad value are one line each."""
    from transformers import HfArgumentParser

    parser = (parser_class or HfArgumentParser)(types, prog=prog)
    for name, kwargs in positional:
        parser.add_argument(name, **kwargs)
    argv = list(argv)
    config = read_config_file(argv)
    if config is not None:
        path, values = config
        del argv[argv.index("--config"):argv.index("--config") + 2]
        for key, value in (values.pop("env", None) or {}).items():
            os.environ[str(key)] = str(value)
        known = parser_fields(parser)
        values = flattened_sections(values, known)
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{path}: unknown config key(s): {', '.join(unknown)}. `{prog} --help` lists the fields")
        check_value_types(parser, values, path)
        parser.set_defaults(**values)
    list_config_flag(parser)  # after the file's keys were checked: `config:` is not one of them
    parser.error = lambda message: _argparse_error(message, prog)  # one line, not the 150-line usage
    try:
        return tuple(parser.parse_args_into_dataclasses(args=argv))
    except ValueError as exc:
        raise UserError(_parse_error_line(exc, prog)) from exc


def list_config_flag(parser) -> None:
    """`--config FILE` in the verb's --help, first after -h: the file is read before argparse runs (above), so
    the flag is only listed (SUPPRESS: never set on the namespace). argparse has no public way to order options:
    its lists are reordered."""
    import argparse

    action = parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                                 help="A YAML file of this verb's fields (sections such as model:, data:, train: "
                                      "may group them); flags given beside it win.")
    for actions in (parser._actions, parser._optionals._group_actions):
        actions.remove(action)
        actions.insert(1, action)


def _argparse_error(message: str, prog: str):
    raise UserError(f"{message}. `{prog} --help` lists the fields and their types")


def check_value_types(parser, values: dict, path: str) -> None:
    """A YAML value that the field's type cannot read (`seed: abc`) is one line naming the file, its line and the
    field. argparse converts a string default only when it is used, and then reports it as a flag's error."""
    for action in parser._actions:  # argparse keeps no public list of its actions
        value = values.get(action.dest)
        if value is None or not callable(action.type):
            continue
        items = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
        if not all(_readable(item, action.type) for item in items):
            line = yaml_key_lines(path).get(action.dest)
            at = f":{line}" if line else ""
            kind = getattr(action.type, "__name__", "value")
            raise UserError(f"config file {path}{at}: {action.dest}: {value!r} is not a valid {kind}")


def _readable(item, kind) -> bool:
    """Whether argparse's `kind` reads a YAML value as it would read a flag's text (1.5 is no int)."""
    if not isinstance(item, str) and kind not in (int, float):
        return True  # a parsed value for another type: the dataclass checks it
    if kind is int and isinstance(item, float) and not item.is_integer():
        return False
    try:
        kind(item)
    except (ValueError, TypeError):
        return False
    return True


def flattened_sections(values: dict, known: set[str]) -> dict:
    """A YAML section, `replay: {ratio: 0.5, prompts: [...]}`, as the flat fields the parser knows (replay: true,
    replay_ratio, replay_prompts); `enabled: false` in it sets the section's own switch off. A key of a section
    that names no field stays as `section_key`, which the unknown-key check then names."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and any(name.startswith(f"{key}_") for name in known):
            if key in known:
                flat[key] = bool(value.get("enabled", True))
            flat.update({f"{key}_{sub}": v for sub, v in value.items() if sub != "enabled"})
        else:
            flat[key] = value
    return flat


def _parse_error_line(exc: ValueError, prog: str) -> str:
    text = str(exc)
    if "not used by the HfArgumentParser" in text:
        flags = re.findall(r"'(-[^']*)'", text)
        return f"unknown argument(s): {', '.join(flags) or text}. `{prog} --help` lists them"
    return text.splitlines()[0]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="./weights/glm-4-9b-hf",
        metadata={"help": f"Local model folder, a Hub id (needs network), or an embedded model built locally: "
                  f"{TINY_MODEL_NAME} and the other tiny families, or sftlab:smollm2-135m (a real pretrained one)."},
    )
    dtype: Dtype = field(default="bfloat16", metadata={"help": "Weights dtype when loading."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: eager, sdpa, sdpa_varlen (sftlab's: sdpa per sample of a padding-free "
                  "row), flash_attention_2. None: flash_attention_2 on a GPU with flash_attn installed, else "
                  "sdpa_varlen for padding-free training."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the base weights in 4 bits (bitsandbytes NF4, double "
                                 "quantization, bf16 compute). Needs a CUDA GPU and `pip install bitsandbytes`."}
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (True) or all weights (False)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
        metadata={"help": "Module names that get LoRA, or 'all-linear'."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. lm_head)."}
    )

    RANGES: ClassVar[dict] = {  # lora_alpha 0 scales the update to nothing: a run that trains and learns nothing
        "lora_r": Range(1, integer=True), "lora_dropout": Range(0, high=1, below=True),
        "lora_alpha": Range(0, above=True, note="(the update is scaled by alpha / r)")}

    def __post_init__(self):
        check_fields(self)


@dataclass
class DataArguments:
    data_files: list[str] = field(
        default_factory=lambda: ["./data/alpaca_gpt4_data_zh.json"],
        metadata={"help": "Datasets: files (.json .jsonl .parquet .csv; alpaca, sharegpt, openai messages or "
                  "prompt/completion rows), globs, Hub ids (hub:org/name[:subset[:split]]) or shipped data "
                  "(sftlab:demo, sftlab:identity); or, per dataset, a mapping {path, columns, max_samples, "
                  "weight} (JSON on the command line; see sftlab.data.sources)."},
    )
    test_size: float = field(
        default=0.05, metadata={"help": "Share of rows held out for evaluation (0 disables the split)."}
    )
    split_seed: int = field(
        default=42, metadata={"help": "Seed of the train/test split: every process draws the same split."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message for rows that have none of their own. Unset: none is "
                                "added, so a chat template that writes a default system prompt (SmolLM2's) trains "
                                "it in; \"\": an empty one, which keeps that default out; text: that text. The run "
                                "records it; chat, probes and serve use it for conversations without a system "
                                "message."}
    )
    overflow: Overflow = field(
        default="drop", metadata={"help": "Samples over max_length: drop (counted) or truncate (part of the answer "
                                  "and its terminator kept)."},
    )

    RANGES: ClassVar[dict] = {"test_size": Range(0, high=1, below=True)}

    def __post_init__(self):
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]
        check_fields(self)


DEFAULT_BOILERPLATE = ["作为一个AI语言模型", "作为一个人工智能语言模型", "As an AI language model"]  # case-insensitive


MAX_ROW_BYTES = 4 * 2**20


@dataclass
class CleanArguments:
    """The cleaning stage: `sftlab data clean`, and `sftlab train` before it tokenizes."""

    clean: bool = field(default=True, metadata={"help": "Run the cleaning filters before training (train only)."})
    data_format: str = field(
        default="auto", metadata={"help": "auto: each row's format from its keys; or a format's name (alpaca, "
                                  "sharegpt, openai, prompt_completion, or any other in sftlab.data.convert.FORMATS), "
                                  "which every row must then be.", "aliases": ["--format"]},
    )
    near_dedup: bool = field(default=True, metadata={"help": "Drop near-duplicate rows (MinHash/LSH)."})
    near_dedup_threshold: float = field(
        default=0.9, metadata={"help": "Estimated Jaccard similarity of character 5-grams above which a row is a "
                               "near duplicate of an earlier one."}
    )
    min_response_chars: int = field(
        default=1, metadata={"help": "Minimum characters in the last assistant reply (shorter: short_response)."}
    )
    boilerplate: list[str] = field(
        default_factory=lambda: list(DEFAULT_BOILERPLATE),
        metadata={"help": "Phrases that reject a row when a reply contains them (case-insensitive). [] disables."},
    )
    strict: bool = field(
        default=False, metadata={"help": "Fail on the first malformed row, naming its file:line, instead of "
                                 "counting it and going on."}
    )
    tool_fallback: bool = field(
        default=True, metadata={"help": "For a chat template that renders no tools (SmolLM2's): train tool rows in "
                                "sftlab's fallback form (tools as JSON in the system message, a call as a JSON reply, "
                                "a result as a user message; chat and serve render it the same way). false: rows "
                                "with calls are tools_unsupported, rows that only list tools keep their "
                                "conversation without them (counted as the repair tools_dropped)."}
    )
    max_row_bytes: int = field(
        default=MAX_ROW_BYTES, metadata={"help": "A row (a JSON line, or a record of a JSON array) larger than this "
                                         "many bytes is rejected as too_large before it is parsed or tokenized, so "
                                         "one huge row cannot take the machine's memory (a 50 MB row took 18 GB). "
                                         "4 MiB is about a million tokens."}
    )
    num_proc: int | None = field(
        default=None, metadata={"help": "Worker processes that check and tokenize the rows. None: one per core for "
                                "inputs of 4,096 rows or more (below that, starting them costs more than they save); "
                                "1: all in this process. The result is the same with any number."}
    )
    datatrove_tasks: int | None = field(
        default=None, metadata={"help": "Check and tokenize the rows as this many datatrove tasks (its "
                                "LocalPipelineExecutor, num_proc of them at a time; a task that completed is not run "
                                "again), then decide duplicates in one pass over their results: the same result as "
                                "without. None: sftlab's own worker pool. Across machines, run the same steps under "
                                "datatrove's Slurm or Ray executor (sftlab.data.pipeline; docs/large-datasets.md)."}
    )

    RANGES: ClassVar[dict] = {
        "near_dedup_threshold": Range(0, above=True, high=1), "min_response_chars": Range(0, integer=True),
        "max_row_bytes": Range(1, integer=True), "num_proc": Range(1, integer=True, nullable=True),
        "datatrove_tasks": Range(1, integer=True, nullable=True)}

    def __post_init__(self):
        check_fields(self)
        if self.boilerplate == ["none"]:
            self.boilerplate = []
