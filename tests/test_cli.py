"""Each user error is one line on stderr and exit code 2, with no traceback (unless --debug).

Most tests call `sftlab.cli.main` in this process (importing torch and transformers once); a few, marked slow,
run the real console entry point in a subprocess."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from sftlab import cli


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def sftlab(*args, capsys=None):
    """`sftlab ARGS` in this process, with its output captured by pytest's capsys."""
    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return Result(code, out, err)


def sftlab_subprocess(*args, stdin=None):
    """The real entry point, in a fresh process with the suite's environment (read at call time)."""
    return subprocess.run([sys.executable, "-m", "sftlab.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300, input=stdin)


@pytest.mark.parametrize("args, message", [
    (["chat", "--model", "./weights/missing", "--prompt", "hi"],
     "sftlab chat: error: model path ./weights/missing does not exist."),
    (["chat", "--model", "THUDM/glm-4-9b-chat-hf", "--prompt", "hi"],
     "sftlab chat: error: THUDM/glm-4-9b-chat-hf is a Hub id, and the Hub is offline (HF_HUB_OFFLINE=1)"),
    (["train", "--model_name_or_path", "sftlab:tiny-glm4", "--bf16", "false", "--lora_rnk", "4"],
     "sftlab train: error: unknown argument(s): --lora_rnk. `sftlab train --help` lists them"),
    (["train", "--config", "configs/demo.yaml", "--data_files", "data/missing.json", "--output_dir", "{tmp}"],
     "sftlab train: error: data file data/missing.json does not exist"),
    (["train", "--config", "configs/nope.yaml"], "sftlab train: error: config file configs/nope.yaml does not exist"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = sftlab(*[a.replace("{tmp}", str(tmp_path / "run")) for a in args], capsys=capsys)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sftlab ")]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_console_entry_point_gives_one_line_and_debug_gives_the_traceback():
    result = sftlab_subprocess("chat", "--model", "./weights/missing", "--prompt", "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "sftlab chat: error: model path ./weights/missing does not exist. Pass a local model folder, a Hub id like "
        "THUDM/glm-4-9b-hf, or an embedded model (sftlab:tiny-glm4, sftlab:tiny-glm4-0414, sftlab:tiny-qwen3, "
        "sftlab:tiny-llama3, sftlab:smollm2-135m)"]
    result = sftlab_subprocess("--debug", "chat", "--model", "./weights/missing", "--prompt", "hi")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_unknown_verb_prints_usage(capsys):
    result = sftlab("fly", capsys=capsys)
    assert result.returncode == 2 and "verbs:" in result.stderr


def test_data_clean_and_inspect_on_the_demo_data(tmp_path, capsys):
    result = sftlab("data", "clean", "sftlab:demo", "--output", str(tmp_path / "clean"), capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "data: 177 rows read, 177 kept, 0 rejected (none)" in result.stdout
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == [
        "clean.jsonl", "lengths.png", "rejected.jsonl", "report.json", "report.md"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "hello there"}\n{"instruction": \n')
    result = sftlab("data", "inspect", str(bad), capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "format: alpaca (1 rows)" in result.stdout
    assert "[gMASK]<sop><|user|>\nhi<|assistant|>«\nhello there<|endoftext|>»" in result.stdout
    assert f"{bad}:2: not usable: bad_json" in result.stdout
    result = sftlab("data", "clean", str(bad), "--output", str(tmp_path / "strict"), "--strict", "true",
                    capsys=capsys)
    assert result.returncode == 2 and f"error: {bad}:2: bad_json" in result.stderr



def test_data_inspect_reads_a_dataset_as_training_does_columns_included(tmp_path, capsys):
    """`data inspect` and `eval --data` read through the reader training uses: per-dataset columns apply."""
    data = tmp_path / "renamed.jsonl"
    data.write_text(json.dumps({"question": "hi", "answer": "hello there"}) + "\n")
    spec = json.dumps({"path": str(data), "columns": {"instruction": "question", "output": "answer"}})
    result = sftlab("data", "inspect", spec, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "format: alpaca (1 rows)" in result.stdout and "rows: 1  (renderable: 1, not: 0)" in result.stdout


@pytest.mark.slow
def test_interactive_chat_keeps_history_and_obeys_commands():
    script = "hi\n/system Be brief.\nhello\n/clear\n/exit\n"
    result = sftlab_subprocess("chat", "--model", "sftlab:tiny-glm4", "--max_new_tokens", "3", "--temperature", "0",
                               stdin=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("Assistant: ") == 2
    assert "(system prompt set; history cleared)" in out and "(history cleared)" in out
    assert result.stderr.count("(stopped at max_new_tokens=3)") == 2  # the random base model never stops


def test_report_to_tensorboard_without_tensorboard_is_a_clear_error(capsys):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed")
    result = sftlab("train", "--model_name_or_path", "sftlab:tiny-glm4", "--report_to", "tensorboard", capsys=capsys)
    assert result.returncode == 2 and "report_to: tensorboard needs `pip install tensorboard`" in result.stderr


def test_eval_on_a_data_file_with_a_model_name_needs_an_output(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"instruction": "你是谁？", "output": "我是灵犀。"}\n{"instruction": "", "output": "x"}\n')
    result = sftlab("eval", "--model", "sftlab:tiny-glm4", "--data", str(data), "--max_new_tokens", "4", capsys=capsys)
    assert result.returncode == 2 and "is not a run folder: pass --output DIR" in result.stderr
    result = sftlab("eval", "--model", "sftlab:tiny-glm4", "--data", str(data), "--max_new_tokens", "4",
                    "--output", str(tmp_path / "eval"), capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "eval: 1 of 2 rows left out: {'empty_instruction': 1}" in result.stdout
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results) == ["model"] and results["model"]["n"] == 1 and results["model"]["mean_new_tokens"] == 4


def test_data_clean_takes_a_yaml_config_flags_win_and_choices_come_from_one_place(tmp_path, capsys):
    config = tmp_path / "clean.yaml"
    config.write_text("near_dedup: false\nboilerplate: []\nmin_response_chars: 1000\n")
    result = sftlab("data", "clean", "sftlab:demo", "--output", str(tmp_path / "a"), "--config", str(config),
                    "--min_response_chars", "1", capsys=capsys)
    assert result.returncode == 0 and "177 kept" in result.stdout  # the flag beat the YAML's 1000
    config.write_text("data_format: yaml\n")
    result = sftlab("data", "clean", "sftlab:demo", "--output", str(tmp_path / "b"), "--config", str(config),
                    capsys=capsys)
    assert result.returncode == 2 and "data_format: 'yaml' is not one of auto, openai, sharegpt, alpaca, " \
                                      "prompt_completion" in result.stderr  # the names of data.convert.FORMATS
    config.write_text("near_dedupe: false\n")
    result = sftlab("data", "clean", "sftlab:demo", "--output", str(tmp_path / "c"), "--config", str(config),
                    capsys=capsys)
    assert result.returncode == 2 and "unknown config key(s): near_dedupe" in result.stderr
    bad_train = tmp_path / "train.yaml"
    bad_train.write_text("model_name_or_path: sftlab:tiny-glm4\nbf16: false\ndtype: float8\n")
    result = sftlab("train", "--config", str(bad_train), capsys=capsys)
    assert result.returncode == 2 and "dtype: 'float8' is not one of auto, bfloat16, float16, float32" in result.stderr


def test_data_clean_without_a_model_counts_characters_and_filters_no_length(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    long_answer = "很长的回答。" * 600  # 3,600 characters: too long for a 512-token limit with most tokenizers
    rows.write_text(json.dumps({"instruction": "写一篇长文。", "output": long_answer}, ensure_ascii=False) + "\n" +
                    json.dumps({"instruction": "你是谁？", "output": "我是灵犀。"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    result = sftlab("data", "clean", str(rows), "--output", str(tmp_path / "chars"), capsys=capsys)
    assert result.returncode == 0
    assert "note: lengths are in characters: token counts and the too_long filter need --model PATH" in result.stdout
    assert "2 kept, 0 rejected (none); characters p50 9, p99 9, max 3606" in result.stdout
    report = json.loads((tmp_path / "chars" / "report.json").read_text())
    assert "tokens" not in report and report["characters"]["total"]["max"] == 3606 and report["tokenizer"] is None
    assert "## Lengths in characters" in (tmp_path / "chars" / "report.md").read_text()
    result = sftlab("data", "clean", str(rows), "--output", str(tmp_path / "tokens"), "--model", "sftlab:tiny-glm4",
                    capsys=capsys)
    assert "1 kept, 1 rejected (too_long 1); tokens p50" in result.stdout and "note:" not in result.stdout


def test_report_to_accepts_every_tracker_transformers_knows_and_names_a_missing_package(capsys):
    import importlib.util

    from sftlab.train.tracking import REPORT_TO_CHOICES

    assert {"swanlab", "tensorboard", "wandb", "mlflow", "trackio"} <= set(REPORT_TO_CHOICES)
    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed")
    result = sftlab("train", "--model_name_or_path", "sftlab:tiny-glm4", "--report_to", "wandb", capsys=capsys)
    assert result.returncode == 2 and "report_to: wandb needs `pip install wandb`" in result.stderr
    result = sftlab("train", "--model_name_or_path", "sftlab:tiny-glm4", "--report_to", "tensorbored", capsys=capsys)
    assert result.returncode == 2 and "report_to: 'tensorbored' is not one of none, azure_ml" in result.stderr


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_every_verb_is_parsed_one_way_and_lists_its_fields(verb, capsys):
    """One table (cli.VERBS), one parser (config.parse_verb): --help lists the dataclass fields with their help."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([*verb.split(), "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: sftlab {verb} [-h] [--config FILE]")
    assert "\n  --config FILE " in out  # every verb takes a YAML file of its fields, and says so


def test_a_flag_is_spelt_with_underscores_or_dashes_and_config_files_set_any_field(tmp_path):
    from sftlab.config import parse_verb
    from sftlab.infer.serve import ServeArguments

    (tmp_path / "serve.yaml").write_text("model: m\nport: 9000\nenv:\n  SFTLAB_TEST_ENV: set\n")
    (dashed,) = parse_verb("sftlab serve", (ServeArguments,), ["--model", "m", "--api-key", "k", "--max-queue", "3"])
    (underscored,) = parse_verb("sftlab serve", (ServeArguments,), ["--model", "m", "--api_key", "k", "--max_queue", "3"])
    assert dashed == underscored and (dashed.api_key, dashed.max_queue) == ("k", 3)
    (configured,) = parse_verb("sftlab serve", (ServeArguments,), ["--config", str(tmp_path / "serve.yaml"),
                                                                   "--port", "9001"])
    assert (configured.model, configured.port, os.environ.pop("SFTLAB_TEST_ENV")) == ("m", 9001, "set")
