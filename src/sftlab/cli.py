"""`sftlab <verb>`: parse the verb's arguments (one way for every verb: config.parse_verb), call one stage function,
and hold the one error boundary: whatever a verb raises is one line (exit 2 for the user's input, 1 for the
machine's faults or sftlab's own), its traceback in a log file the line names."""

import importlib
import os
import signal
import sys
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    """One verb: its line in `sftlab --help`, and where its arguments and its stage function live."""

    summary: str
    example: str
    module: str  # holds the stage function and its argument dataclasses (and PARSER, where it is TRL's)
    function: str  # called with the parsed dataclasses (and the positional arguments last); returns an exit code
    arguments: str = "ARGUMENTS"  # the module's tuple of argument dataclasses
    positional: tuple = ()  # (name, argparse keywords) pairs
    ignores: tuple = ()  # path fields of its argument dataclasses that this verb does not read or write


INPUTS_HELP = ("Files (.json .jsonl .parquet .csv), globs, Hub dataset ids, or JSON with per-dataset options: "
               "'{\"path\": \"a.jsonl\", \"columns\": {\"output\": \"answer\"}, \"max_samples\": 500}'.")

VERBS = {
    "data clean": Verb("clean data and report what was wrong", "sftlab data clean FILES... --output DIR",
                       "sftlab.data.commands", "clean_data", "CLEAN_ARGUMENTS",
                       (("inputs", {"nargs": "+", "help": INPUTS_HELP}),)),
    "data inspect": Verb("look at a file as the model sees it", "sftlab data inspect FILE", "sftlab.data.commands",
                         "inspect_data", "INSPECT_ARGUMENTS",
                         (("file", {"help": "A data file (.json .jsonl .parquet .csv)."}),)),
    "data score": Verb("score each row's worth with a small model (IFD) and flag misaligned rows",
                       "sftlab data score FILES... --output DIR [--scorer sftlab:smollm2-135m]",
                       "sftlab.data.score", "score_data", "SCORE_ARGUMENTS",
                       (("inputs", {"nargs": "+", "help": INPUTS_HELP}),)),
    "data select": Verb("keep the rows worth training on, by their scores",
                        "sftlab data select FILES... --scores SCORES --top 0.1 --output DIR",
                        "sftlab.data.select", "select_data", "SELECT_ARGUMENTS",
                        (("inputs", {"nargs": "+", "help": "The files that were scored (each checked unchanged)."}),)),
    "data prepare": Verb("clean, render and shard the data of a training config", "sftlab data prepare --config FILE",
                         "sftlab.train.sft", "prepare_only", ignores=("output_dir",)),
    "train": Verb("fine-tune a model (LoRA or full)", "sftlab train --config configs/demo.yaml [--field value ...]",
                  "sftlab.train.sft", "run"),
    "dpo": Verb("preference tuning (DPO) after SFT, on chosen/rejected pairs",
                "sftlab dpo --config configs/demo-dpo.yaml [--field value ...]", "sftlab.train.dpo", "run"),
    "kto": Verb("preference tuning (KTO) after SFT, on replies labelled good or bad (unpaired preference pairs)",
                "sftlab kto --config configs/demo-kto.yaml [--field value ...]", "sftlab.train.kto", "run"),
    "estimate": Verb("tokens, steps, memory and time of a run before launching it", "sftlab estimate --config FILE",
                     "sftlab.train.estimate", "run", ignores=("output_dir",)),
    "eval": Verb("held-out metrics, before/after", "sftlab eval --adapter output/demo --compare_base",
                 "sftlab.eval.evaluate", "run"),
    "doctor": Verb("check a run for template drift and stopping", "sftlab doctor --adapter output/demo",
                   "sftlab.eval.doctor", "run"),
    "chat": Verb("chat with a base model or a run", "sftlab chat --adapter output/demo [--prompt TEXT --json]",
                 "sftlab.infer.chat", "run"),
    "merge": Verb("merge a LoRA run into its base for serving", "sftlab merge --adapter output/demo [--output DIR]",
                  "sftlab.export.merge", "run"),
    "export": Verb("a run as a verified GGUF and Modelfile for llama.cpp and Ollama",
                   "sftlab export --adapter output/demo [--outtype q8_0]", "sftlab.export.gguf", "run"),
    "serve": Verb("an OpenAI-compatible server with a chat page", "sftlab serve --adapter output/demo [--port 8000]",
                  "sftlab.infer.serve", "run"),
}


# What each argument that names a path is, by field name across every verb: the fault matrix
# (tests/test_fault_matrix.py) gives each role its faults, so a new verb's paths are covered by their names.
PATH_FIELDS = {"adapter": "run", "model": "model", "model_name_or_path": "model", "llama_cpp": "model",
               "data_files": "data", "data": "data", "retention_data": "data", "inputs": "data", "file": "data",
               "replay_prompts": "data", "scorer": "model", "scores": "data", "deepspeed": "data", "gguf": "gguf",
               "output": "output", "output_dir": "output"}
# fields whose names look like paths but are not ones sftlab reads or writes itself (TRL's and transformers')
NOT_PATH_FIELDS = {"logging_dir", "hub_model_id", "chat_template_path", "resume_from_checkpoint", "ref_model_path"}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {name:<{width}}  {verb.summary}: {verb.example}" for name, verb in VERBS.items()]
    return ("usage: sftlab [--debug] <verb> [args]\n\nverbs:\n" + "\n".join(lines) +
            "\n\n`sftlab <verb> --help` lists each verb's options (--config FILE.yaml sets any of them; flags win; "
            "each flag is spelt with underscores or dashes). --debug shows tracebacks.")


def split_verb(argv: list[str]) -> tuple[str | None, list[str]]:
    """('data clean', rest) for a two-word verb, ('train', rest) for one word, (None, argv) for neither."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in VERBS:
            return name, argv[words:]
    return None, argv


def run_verb(name: str, argv: list[str]) -> int:
    from sftlab.config import parse_verb

    verb = VERBS[name]
    module = importlib.import_module(verb.module)
    parsed = parse_verb(f"sftlab {name}", getattr(module, verb.arguments), argv, getattr(module, "PARSER", None),
                        verb.positional)
    if verb.positional:  # the positional arguments come back as one namespace, after the dataclasses
        *parsed, extra = parsed
        parsed = [*parsed, *(getattr(extra, p) for p, _ in verb.positional)]
    code = getattr(module, verb.function)(*parsed)
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    name, rest = split_verb(argv)
    if name is None:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(usage(), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    from sftlab.errors import UserError, failure_line, interrupted_line, raise_terminated, report, save_traceback

    verb = name.split()[0]
    debug = debug or os.environ.get("SFTLAB_DEBUG", "") not in ("", "0")
    # SIGTERM as an exception where the verb is (training installs its own, which stop at a step)
    on_sigterm = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if on_sigterm:
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return run_verb(name, rest)
    except UserError as exc:
        if debug:
            raise
        report(verb, exc)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM outside training's own handlers (while a model loads)
        if debug:
            raise
        print(f"sftlab {verb}: {interrupted_line(exc)}", file=sys.stderr, flush=True)
        return 143 if getattr(exc, "signal_name", "") == "SIGTERM" else 130
    except Exception as exc:  # the one boundary: whatever a verb raises is one line, its traceback a log file
        if debug:
            raise
        line, code, worth_a_log = failure_line(exc)
        log = save_traceback(name, exc) if worth_a_log else None
        where = f" (traceback: {log}; SFTLAB_DEBUG=1 prints it)" if log else ""
        print(f"sftlab {verb}: error: {line}{where}", file=sys.stderr, flush=True)
        return code
    finally:
        if on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
