"""The run folder's contract (run_dir.py) and docs/training.md's "What a run directory holds" name the same files, and
the readers and writers round-trip."""

import re
from pathlib import Path

from sftlab import run_dir

README = Path(__file__).resolve().parents[1] / "docs" / "training.md"  # "What a run directory holds"


def readme_files() -> set[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## What a run directory holds"):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    return set(re.findall(r"`([\w./-]+)`", section))


def test_every_file_of_the_contract_is_in_the_readme():
    named = readme_files()
    expected = ({*run_dir.RUN_FILES} | {f"{run_dir.EVAL_DIR}/{name}" for name in run_dir.EVAL_FILES}
                | set(run_dir.CHECKPOINT_FILES))
    assert sorted(expected - named) == []


def test_every_sftlab_file_the_readme_lists_is_in_the_contract():
    """The docs' table also names transformers' and PEFT's files and SwanLab's folder, which are theirs."""
    theirs = {"adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "generation_config.json", "checkpoint-N/", "swanlog/"}
    contract = ({*run_dir.RUN_FILES} | {f"{run_dir.EVAL_DIR}/{name}" for name in run_dir.EVAL_FILES}
                | set(run_dir.CHECKPOINT_FILES))
    listed = {name for name in readme_files() if "." in name or name.endswith("/")}
    assert sorted(listed - contract - theirs) == []


def test_json_and_json_lines_round_trip(tmp_path):
    records = [{"step": 1, "text": "你好"}, {"step": 2, "text": "bye"}]
    run_dir.write_jsonl(tmp_path / "a.jsonl", records)
    run_dir.append_jsonl(tmp_path / "a.jsonl", [{"step": 3}])
    assert run_dir.read_jsonl(tmp_path / "a.jsonl") == records + [{"step": 3}]
    run_dir.keep_lines(tmp_path / "a.jsonl", lambda r: r["step"] != 2)
    assert [r["step"] for r in run_dir.read_jsonl(tmp_path / "a.jsonl")] == [1, 3]
    run_dir.write_json(tmp_path / "b.json", {"x": "你好"})
    assert (tmp_path / "b.json").read_text(encoding="utf-8") == '{\n  "x": "你好"\n}\n'
    assert run_dir.read_json(tmp_path / "b.json") == {"x": "你好"}
    run_dir.write_yaml(tmp_path / "c.yaml", {"b": 1, "a": [1, 2]})
    assert run_dir.read_yaml(tmp_path / "c.yaml") == {"b": 1, "a": [1, 2]}
    assert (run_dir.read_json(tmp_path / "none.json"), run_dir.read_jsonl(tmp_path / "none.jsonl"),
            run_dir.read_yaml(tmp_path / "none.yaml")) == ({}, [], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.json", "c.yaml"]  # no temporary left
