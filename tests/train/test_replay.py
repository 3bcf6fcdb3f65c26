"""Replay (train/replay.py): the base's own answers to general prompts join the training split, and only it, rendered
by the one renderer with the run's system prompt choice, counted apart, cached by content; the replay section of a
YAML config. The base's generation is replaced here by a fixed rule (the tiny model knows nothing worth replaying);
tests/train/test_real_recipes.py trains the real model with replay."""

import json

import pytest

from helpers import demo_args
from sftlab.chat_format import ChatRenderer
from sftlab.data.demo import __file__ as demo_package
from sftlab.data.prepare import prepare_data
from sftlab.data.report import replay_line
from sftlab.errors import UserError
from sftlab.eval.retention import shipped_probes
from sftlab.infer.generate import Reply
from sftlab.train import replay
from sftlab.train.config import parse_args

PROMPTS = [f"Question number {i}?" for i in range(9)]


def fixed_replies(model, tokenizer, conversations, sampling, batch_size=16, progress=None):
    """Two of every three stop; the third runs to the limit. The reply names the system prompt it was asked under."""
    system = [c[0]["content"] if c[0]["role"] == "system" else "-" for c in conversations]
    return [Reply(f"Answer to {c[-1]['content']} under {s}", "stop", 6) if i % 3 else
            Reply("and so on and so on", "length", sampling.max_new_tokens)
            for i, (c, s) in enumerate(zip(conversations, system))]


@pytest.fixture
def generation(monkeypatch):
    calls = []

    def generate(*args, **kwargs):
        calls.append(len(args[2]))
        return fixed_replies(*args, **kwargs)

    monkeypatch.setattr(replay, "generate_replies", generate)
    return calls


@pytest.fixture
def tokenizer(tiny_model_dir):
    """A tokenizer of this module's own: the session's shared one may carry another test's padding settings, which
    the renderer would then apply."""
    from sftlab.model.load import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def prepared(tmp_path, tiny_model_dir, tokenizer, *flags):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n" + PROMPTS[0] + "\n", encoding="utf-8")
    model_args, data_args, clean_args, train_args = parse_args(demo_args(
        tmp_path / "run", "--replay", "true", "--replay_prompts", str(tmp_path / "prompts.txt"), *flags))
    renderer = ChatRenderer(tokenizer, train_args.max_length, data_args.overflow)
    task = prepare_data(data_args, clean_args, renderer)
    return task, replay.with_replay(task, tiny_model_dir, renderer, data_args, clean_args, train_args, "float32")


def test_replay_rows_join_the_training_split_only_counted_apart(tmp_path, tiny_model_dir, tokenizer, generation):
    task, data = prepared(tmp_path, tiny_model_dir, tokenizer, "--replay_ratio", "0.025", "--system_prompt",
                          "Be brief.")
    assert round(0.025 * len(task.train)) == 4 and generation == [9]  # 9 prompts: a repeat and a blank line skipped
    assert data.report["replay"] == {
        "prompts": 9, "stopped": 6, "not_stopped": 3, "wanted": 4, "used": 4, "kept": 4, "rejected": 0,
        "ratio": 0.025, "task_train_rows": len(task.train), "replies": data.report["replay"]["replies"]}
    assert len(data.train) == len(task.train) + 4
    assert list(data.test["input_ids"]) == list(task.test["input_ids"]) and list(data.heldout) == list(task.heldout)
    added = [tokenizer.decode(ids) for ids in data.train["input_ids"][len(task.train):]]
    # rendered like the task's rows: the run's system prompt, the prompt, the base's reply, the terminator
    assert all(text.startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\nQuestion number ") for text in added), added
    assert all("<|assistant|>\nAnswer to Question number" in text and "under Be brief." in text for text in added)
    assert all(text.endswith("<|endoftext|>") for text in added)
    assert data.fingerprint != task.fingerprint
    assert "replay: 4 rows of the base's own answers added to" in replay_line(data.report)


def test_the_replies_are_generated_once_per_base_prompts_and_system_prompt(tmp_path, tiny_model_dir, tokenizer,
                                                                          generation):
    _, first = prepared(tmp_path, tiny_model_dir, tokenizer, "--replay_ratio", "0.025")
    _, again = prepared(tmp_path, tiny_model_dir, tokenizer, "--replay_ratio", "0.025")
    assert generation == [9] and again.fingerprint == first.fingerprint  # the second read the cache
    _, other = prepared(tmp_path, tiny_model_dir, tokenizer, "--replay_ratio", "0.025", "--system_prompt", "Hi.")
    assert generation == [9, 9] and other.fingerprint != first.fingerprint


def test_short_of_stopped_replies_uses_them_all_and_says_so(tmp_path, tiny_model_dir, tokenizer, generation):
    task, data = prepared(tmp_path, tiny_model_dir, tokenizer, "--replay_ratio", "1.0")
    assert data.report["replay"]["used"] == 6 and len(data.train) == len(task.train) + 6
    assert data.report["replay"]["short_by"] == f"{len(task.train) - 6} (only 6 replies stopped)"


def test_replay_prompts_files_and_their_errors(tmp_path):
    builtin = replay.read_prompts(["sftlab:replay-prompts"])
    assert len(builtin) == 150 and not set(builtin) & {p.prompt for p in shipped_probes()}
    assert sum(any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in builtin) == 75  # half in Chinese
    rows = tmp_path / "mine.jsonl"
    rows.write_text('{"prompt": "A?"}\n{"instruction": "B", "input": "c"}\n{"text": "no prompt"}\n', "utf-8")
    with pytest.raises(UserError, match=r"mine.jsonl:3: field prompt: expected a non-empty string"):
        replay.read_prompts([str(rows)])
    rows.write_text('{"prompt": "A?"}\n{"instruction": "B", "input": "c"}\n', "utf-8")
    assert replay.read_prompts([str(rows), "sftlab:replay-prompts"])[:3] == ["A?", "B\nc", builtin[0]]
    with pytest.raises(UserError, match=r"replay_prompts: .*nothing.txt does not exist"):
        replay.read_prompts([str(tmp_path / "nothing.txt")])


def test_a_yaml_replay_section_sets_the_flat_fields(tmp_path):
    config = tmp_path / "c.yaml"
    (tmp_path / "a.txt").write_text("What is 2 + 2?\n")
    config.write_text(f"replay:\n  ratio: 0.25\n  prompts: [{tmp_path / 'a.txt'}]\n  max_new_tokens: 64\n", "utf-8")
    *_, train_args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "o")])
    assert (train_args.replay, train_args.replay_ratio, train_args.replay_prompts,
            train_args.replay_max_new_tokens) == (True, 0.25, [str(tmp_path / "a.txt")], 64)
    config.write_text("replay:\n  enabled: false\n  ratio: 0.25\n", "utf-8")
    *_, train_args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "o")])
    assert (train_args.replay, train_args.replay_ratio) == (False, 0.25)
    *_, train_args = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "o"), "--replay", "true"])
    assert train_args.replay  # a flag wins over the file
    config.write_text("replay:\n  ratoi: 0.25\n", "utf-8")
    with pytest.raises(UserError, match="unknown config key.*replay_ratoi"):
        parse_args(["--config", str(config)])
    with pytest.raises(UserError, match="replay_ratio: must be a positive number, got 0"):
        parse_args(["--replay_ratio", "0"])


def test_the_shipped_replay_prompts_are_package_data():
    from pathlib import Path

    assert (Path(demo_package).parent / "replay_prompts.jsonl").is_file()
    assert all(set(json.loads(line)) == {"prompt"} for line in
               (Path(demo_package).parent / "replay_prompts.jsonl").read_text("utf-8").splitlines())
