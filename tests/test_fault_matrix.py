"""The fault matrix, generated from cli.VERBS: for every verb, every path argument it takes (found by field name in
its argument dataclasses, cli.PATH_FIELDS) pointed at a missing path, at a file where a folder is expected or the
reverse, and at an unwritable place; its --config missing, a folder, emptied, truncated and garbage; and (slow) every
file of the folders it reads, found by watching which files a valid invocation opens, truncated, emptied and
replaced with garbage. Each case: a non-zero exit, no traceback, the path named. A new verb gets its cases from
its example line (cli.Verb.example) without anyone writing them.

The verbs run in this process (cli.main, as `sftlab` runs them) so that a case costs what the verb's own checks
cost, not an interpreter start; `sftlab serve` is stopped where it would start listening."""

import dataclasses
import importlib
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, TRAINED
from sftlab import cli

UNWRITABLE = Path("/sys/sftlab-fault-matrix/out")  # not even root may create a folder in sysfs
CASE_TIMEOUT_S = 120


def verb_fields(name: str) -> set[str]:
    verb = cli.VERBS[name]
    module = importlib.import_module(verb.module)
    fields = {f.name for klass in getattr(module, verb.arguments) for f in dataclasses.fields(klass)}
    return fields | {p for p, _ in verb.positional}


def example_argv(name: str, paths: dict) -> list[str]:
    """The verb's example line (`sftlab --help` shows it) with its placeholders filled: a valid invocation."""
    words = cli.VERBS[name].example.split(" [")[0].split()[1 + len(name.split()):]
    filled = []
    for i, word in enumerate(words):
        if word == "FILE" and i and words[i - 1] == "--config":
            word = "{config}"
        filled.append(paths.get(word, word))
    return filled


def names_the_demo_run(argv: list[str]) -> bool:
    """Whether the example's config starts from the SFT demo's run (`./output/demo`, as the DPO demo does)."""
    if "--config" not in argv:
        return False
    config = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    return str(config.get("model_name_or_path", "")).removeprefix("./") == "output/demo"


def path_cases() -> list:
    """(verb, field, fault) for every path field of every verb, and every verb's --config: the first fault of
    each in the quick loop, the others slow."""
    cases = []
    for name in cli.VERBS:
        fields = sorted(verb_fields(name) & set(cli.PATH_FIELDS) - set(cli.VERBS[name].ignores))
        for field, role in [(f, cli.PATH_FIELDS[f]) for f in fields] + [("config", "config")]:
            cases += [pytest.param(name, field, fault, marks=[pytest.mark.slow] if n else [])
                      for n, fault in enumerate(FAULTS[role])]
    return cases


FAULTS = {"run": ("missing", "a file", "an empty folder"), "model": ("missing", "a file", "an empty folder"),
          "data": ("missing", "a folder"), "gguf": ("missing", "a folder", "empty", "garbage"),
          "output": ("unwritable", "under a file", "a file"), "config": ("missing", "a folder", "empty", "garbage", "truncated")}


def fault_path(fault: str, tmp: Path) -> Path:
    place = tmp / "fault"
    if fault == "a folder" or fault == "an empty folder":
        place.mkdir()
    elif fault == "a file":
        place.write_text("not a folder\n")
    elif fault == "empty":
        place.write_bytes(b"")
    elif fault == "garbage":
        place.write_bytes(os.urandom(4096))
    elif fault == "truncated":
        text = (REPO / "configs" / "demo.yaml").read_text()
        place.write_text(text[:len(text) // 2].rsplit("\n", 1)[0] + "\n  - [unclosed: {")
    elif fault == "under a file":
        (tmp / "a_file").write_text("x")
        place = tmp / "a_file" / "out"
    elif fault == "unwritable":
        place = UNWRITABLE
    return place


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    def too_long(*_):
        raise TimeoutError(f"sftlab {' '.join(argv)} ran past {CASE_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        code = cli.main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def no_listening(monkeypatch):
    """serve returns where it would start listening: a fault it missed is then exit 0, not a hang."""
    import uvicorn

    import sftlab.infer.serve as serve

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(serve, "check_listen", lambda *a: None)  # port 8000 may be taken where the suite runs
    monkeypatch.setenv("SFTLAB_HOME", os.environ["SFTLAB_HOME"])


@pytest.fixture(scope="module")
def valid_paths(trained_run, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("valid")
    data = tmp / "data.jsonl"
    shutil.copy(REPO / "src" / "sftlab" / "data" / "demo" / "identity.jsonl", data)
    assert cli.main(["data", "score", str(data), "--output", str(tmp / "scored"), "--scorer", str(tiny_model_dir)]) == 0
    return {"output/demo": str(trained_run(*TRAINED)), "FILES...": str(data), "FILE": str(data), "DIR": str(tmp / "out"),
            "SCORES": str(tmp / "scored" / "scores.jsonl"),
            "{config}": str(REPO / "configs" / "demo.yaml"),
            "configs/demo.yaml": str(REPO / "configs" / "demo.yaml"),
            "configs/demo-dpo.yaml": str(REPO / "configs" / "demo-dpo.yaml")}


def test_every_verb_example_fills_to_an_invocation_and_every_path_field_has_a_role():
    placeholders = {"output/demo", "FILES...", "FILE", "DIR", "SCORES", "{config}", "configs/demo.yaml",
                    "configs/demo-dpo.yaml"}
    for name in cli.VERBS:
        words = example_argv(name, {p: p for p in placeholders})
        assert all(not w.isupper() or w in placeholders for w in words), (name, words)
        # a field that names a path must have a role, so that the matrix covers it
        pathlike = {f for f in verb_fields(name) if f.endswith(("_dir", "_path", "_file", "_files")) or
                    f in ("adapter", "model", "output", "data", "gguf", "inputs", "file")}
        assert pathlike - set(cli.PATH_FIELDS) - cli.NOT_PATH_FIELDS == set(), name


@pytest.mark.parametrize("verb, field, fault", path_cases(), ids=lambda v: str(v).replace(" ", "-"))
def test_a_bad_path_is_one_line_naming_it(verb, field, fault, valid_paths, tmp_path, capsys, no_listening,
                                          monkeypatch):
    monkeypatch.chdir(REPO)
    argv = verb.split() + example_argv(verb, valid_paths)
    if "output_dir" in verb_fields(verb):  # a training verb: into a fresh folder, without a tracker
        argv += ["--output_dir", str(tmp_path / "run"), "--report_to", "none"]
    if field != "model_name_or_path" and names_the_demo_run(argv):  # the demo run is not there in a fresh clone
        argv += ["--model_name_or_path", valid_paths["output/demo"]]
    if field == "model" and "--adapter" in argv:  # the model alone, not as the base of the example's run
        del argv[argv.index("--adapter"):argv.index("--adapter") + 2]
        argv = [a for a in argv if a != "--compare_base"]
    bad = fault_path(fault, tmp_path)
    positional = dict(cli.VERBS[verb].positional)
    if field in positional:  # the example's positional value is the data placeholder
        argv = [str(bad) if a == valid_paths["FILE"] else a for a in argv]
    elif field == "config" and "--config" in argv:
        argv[argv.index("--config") + 1] = str(bad)
    else:
        argv += [f"--{field}", str(bad)]
    code, out = run_cli(argv, capsys)
    assert code != 0, f"exit 0 for {fault} {field}:\n{out[-2000:]}"
    assert "Traceback" not in out, out[-3000:]
    assert str(bad) in out or str(bad.parent) in out, f"the path is not named:\n{out[-2000:]}"


# the slow half: each file a valid invocation of the verb opens in a folder it was given (the run, the base model),
# truncated, emptied and replaced with garbage
FAST = {"chat": ["--prompt", "hi", "--max_new_tokens", "2"], "eval": ["--max_new_tokens", "2"],
        "train": ["--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--final_eval_samples", "0"],
        "dpo": ["--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--final_eval_samples", "0"],
        "export": ["--max_new_tokens", "2"]}
CONTENT_FAULTS = ("truncated", "emptied", "garbage")


def damage(path: Path, fault: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "emptied": b"", "garbage": os.urandom(max(64, len(data) // 8))}[fault])


def files_opened(argv: list[str], folders: list[Path], capsys) -> list[Path]:
    """The files under `folders` that `sftlab argv` opens, seen by an audit hook (the hook stays, muted, after)."""
    opened, watching = set(), [True]

    def hook(event, args):
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = Path(os.fsdecode(args[0])).resolve()
            if any(path.is_relative_to(f) for f in folders) and path.is_file():
                opened.add(path)

    sys.addaudithook(hook)
    try:
        code, out = run_cli(argv, capsys)
    finally:
        watching[0] = False
    assert code == 0, f"the valid invocation failed: {out[-2000:]}"
    return sorted(opened)


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoint-*") if (source / "manifest.json").exists()
                    else None)
    return target


def model_field(verb: str) -> str | None:
    """The field a verb takes its model in, by its role (cli.PATH_FIELDS), whatever its name."""
    fields = [f for f in ("model", "model_name_or_path") if f in verb_fields(verb)]
    return (fields or sorted(f for f in verb_fields(verb) if cli.PATH_FIELDS.get(f) == "model" and f != "llama_cpp")
            or [None])[0]


@pytest.mark.slow
@pytest.mark.parametrize("verb", [v for v in cli.VERBS if "output/demo" in cli.VERBS[v].example or model_field(v)])
def test_every_file_a_verb_reads_damaged_is_one_line_naming_it(verb, valid_paths, tiny_model_dir, tmp_path, capsys,
                                                              no_listening, monkeypatch):
    monkeypatch.chdir(REPO)
    run, model = copy_folder(Path(valid_paths["output/demo"]), tmp_path / "run"), copy_folder(tiny_model_dir, tmp_path / "model")
    paths = {**valid_paths, "output/demo": str(run), "DIR": str(tmp_path / "out")}
    argv = verb.split() + example_argv(verb, paths) + FAST.get(verb, [])
    fields = verb_fields(verb)
    if "--adapter" not in argv or verb in ("chat", "eval", "serve", "doctor"):  # these take --model as its base
        argv += [f"--{model_field(verb)}", str(model)] if model_field(verb) else []
    if "output_dir" in fields:
        argv += ["--output_dir", str(tmp_path / "train"), "--report_to", "none"]
    if "output" in fields and "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    files = files_opened(argv, [run.resolve(), model.resolve()], capsys)
    assert files, "the valid invocation read nothing from the folders it was given"
    problems = []
    for path in files:
        for fault in CONTENT_FAULTS:
            original = path.read_bytes()
            damage(path, fault)
            shutil.rmtree(tmp_path / "out", ignore_errors=True)
            shutil.rmtree(tmp_path / "train", ignore_errors=True)
            try:
                code, out = run_cli(argv, capsys)
            finally:
                path.write_bytes(original)
            if code == 0 and fault != "garbage" and path.name in TOLERATED:
                continue
            if code == 0 or "Traceback" in out or (str(path) not in out and str(path.parent) not in out):
                problems.append(f"{path.relative_to(tmp_path)} {fault}: exit {code}: {out.strip()[-600:]}")
    assert not problems, "\n".join(problems)


# files a verb may read and do without when they are empty or cut short (a record of what happened, not an input)
TOLERATED = {"trainer_log.jsonl", "predictions.jsonl", "rejected.jsonl", "README.md", "report.md", "heldout.jsonl"}
