"""`sftlab data score` and `sftlab data select`: the scores equal a plain-transformers reference, the scoring is
committed a shard at a time and resumed, and selection puts every kept row on one side of the cut with why."""

import functools
import json
from pathlib import Path

import pytest
import torch

from sftlab import cli
from sftlab.data import score as score_module
from sftlab.data.scorer import Pool
from sftlab.model.tiny import ensure_tiny_model

ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "把下面的词翻译成英文。", "input": "猫", "output": "Cat."},
    {"instruction": "告诉我2+3等于多少？", "input": "", "output": "2+3等于5。"},
    {"messages": [{"role": "user", "content": "Hi, who are you?"}, {"role": "assistant", "content": "I am Lingxi."},
                  {"role": "user", "content": "What can you do?"},
                  {"role": "assistant", "content": "I answer questions and translate short texts."}]},
    {"instruction": "List three primary colors.", "input": "", "output": "Red, yellow and blue."},
    {"instruction": "How many legs does a spider have?", "input": "", "output": "A spider has eight legs."},
]


def write_rows(path: Path, rows: list[dict], bad_line: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text + ('{"instruction": "broken", \n' if bad_line else ""), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@functools.cache
def reference_model(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(model_dir),
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())


def reference_scores(model_dir: Path, messages: list[dict]) -> tuple[float, float]:
    """(loss_conditioned, loss_unconditioned) of the last reply, one sequence at a time, with transformers alone:
    the prompt from the tokenizer's chat template, the reply's ids from tokenizing its text alone."""
    tokenizer, model = reference_model(model_dir)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    if "<|assistant|>" in prompt:  # GLM-4 writes a newline between <|assistant|> and the reply
        prompt += "\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    reply_ids = tokenizer(messages[-1]["content"], add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    skip = 0 if bos is not None else 1  # without BOS the reply's first token is scored in neither

    def mean_loss(ids: list[int], first: int) -> float:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
        return float(losses[first - 1:].mean())

    conditioned = mean_loss(prompt_ids + reply_ids, len(prompt_ids) + skip)
    alone = mean_loss(([bos] if bos is not None else []) + reply_ids, 1)
    return conditioned, alone


def as_messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")  # alpaca: a blank line, then the input
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


@pytest.mark.parametrize("family", ["sftlab:tiny-glm4", "sftlab:tiny-llama3"])  # without a BOS token, and with
def test_scores_equal_a_plain_transformers_reference(family, tmp_path, sftlab_home, capsys):
    model_dir = ensure_tiny_model(family)
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    assert cli.main(["data", "score", str(data), "--output", str(tmp_path / "scored"), "--scorer", str(model_dir),
                     "--max_tokens_per_batch", "256"]) == 0
    scores = read_jsonl(tmp_path / "scored" / "scores.jsonl")
    assert [(s["file"], s["line"]) for s in scores] == [(str(data), n) for n in range(1, len(ROWS) + 1)]
    for row, scored in zip(ROWS, scores):
        conditioned, alone = reference_scores(model_dir, as_messages(row))
        assert scored["loss_conditioned"] == pytest.approx(conditioned, abs=1e-4)
        assert scored["loss_unconditioned"] == pytest.approx(alone, abs=1e-4)
        assert scored["ifd"] == pytest.approx(conditioned / alone, abs=1e-4)
        assert scored["relevance"] == pytest.approx(scored["loss_conditioned"] / scored["loss_other"], abs=1e-4)
        assert scored["misaligned"] == (scored["ifd"] >= 1 or scored["relevance"] >= 1.05
                                        or scored["best_other_ratio"] >= 1.08)


def test_the_outputs_are_the_scores_and_the_cleaning_they_are_built_on(tmp_path, tiny_model_dir, capsys):
    data = write_rows(tmp_path / "rows.jsonl", ROWS, bad_line=True)
    out = tmp_path / "scored"
    assert cli.main(["data", "score", str(data), "--output", str(out), "--scorer", str(tiny_model_dir)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cleaning", "score_report.json", "scores.jsonl"]
    assert sorted(p.name for p in (out / "cleaning").iterdir()) == ["clean.jsonl", "lengths.png", "rejected.jsonl",
                                                                    "report.json", "report.md"]
    assert [r["line"] for r in read_jsonl(out / "cleaning" / "rejected.jsonl")] == [len(ROWS) + 1]  # counted
    report = json.loads((out / "score_report.json").read_text())
    assert report["rows"] == len(ROWS) and report["scored_this_run"] == len(ROWS)
    assert report["misaligned"] == sum(s["misaligned"] for s in read_jsonl(out / "scores.jsonl"))
    assert "scored 6 rows with" in capsys.readouterr().out


def test_an_interrupted_scoring_goes_on_from_its_first_uncommitted_shard(tmp_path, tiny_model_dir, monkeypatch,
                                                                         capsys):
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    args = ["data", "score", str(data), "--scorer", str(tiny_model_dir), "--shard_rows", "2"]
    assert cli.main([*args, "--output", str(tmp_path / "whole")]) == 0
    whole = (tmp_path / "whole" / "scores.jsonl").read_text()

    real, calls = score_module.score_batch, []

    def stopped_at_the_second_shard(*a, **k):
        calls.append(len(a[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(score_module, "score_batch", stopped_at_the_second_shard)
    out = tmp_path / "resumed"
    assert cli.main([*args, "--output", str(out)]) == 130
    assert not (out / "scores.jsonl").exists() and not (out / "score_report.json").exists()  # nothing looks done
    assert len(list((out / ".score-shards").glob("*/*.jsonl"))) == 1  # the first shard, committed
    calls.clear()
    monkeypatch.setattr(score_module, "score_batch", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    assert cli.main([*args, "--output", str(out)]) == 0
    assert calls == [2, 2]  # the second and third shards only
    assert (out / "scores.jsonl").read_text() == whole
    assert not (out / ".score-shards").exists()
    assert json.loads((out / "score_report.json").read_text())["scored_this_run"] == 4


@pytest.fixture
def scored(tmp_path, tiny_model_dir, capsys):
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    assert cli.main(["data", "score", str(data), "--output", str(tmp_path / "scored"), "--scorer",
                     str(tiny_model_dir)]) == 0
    capsys.readouterr()
    return data, tmp_path / "scored" / "scores.jsonl"


def planted(scores_path: Path, ifds: list[float], misaligned: list[bool]) -> None:
    """Known scores written over the tiny model's (which are near 1 for every row), so the cut is exact."""
    records = read_jsonl(scores_path)
    for record, ifd, flag in zip(records, ifds, misaligned):
        record.update(ifd=ifd, misaligned=flag, relevance=1.2 if flag else 0.5)
    scores_path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_selection_keeps_the_highest_ifd_among_aligned_rows_and_says_why_of_the_rest(scored, tmp_path, capsys):
    data, scores = scored
    planted(scores, [0.9, 0.2, 0.7, 0.8, 0.95, None], [False, False, False, False, True, False])
    out = tmp_path / "selected"
    assert cli.main(["data", "select", str(data), "--scores", str(scores), "--keep", "2", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ifd.png", "report.md", "select_report.json", "selected.jsonl",
                                                     "unselected.jsonl"]
    selected, unselected = read_jsonl(out / "selected.jsonl"), read_jsonl(out / "unselected.jsonl")
    assert [r["line"] for r in selected] == [1, 4]  # 0.9 and 0.8; line 5 (0.95) is misaligned
    assert {r["line"]: r["reason"].split(":")[0] for r in unselected} == {
        2: "below the cut", 3: "below the cut", 5: "misaligned", 6: "not scored"}
    assert sorted(r["line"] for r in selected + unselected) == list(range(1, len(ROWS) + 1))  # every kept row
    assert selected[0]["messages"][-1]["content"] == ROWS[0]["output"] and selected[0]["scores"]["ifd"] == 0.9
    report = json.loads((out / "select_report.json").read_text())
    assert (report["selected"], report["unselected"], report["cut"]) == (2, 4, 0.8)
    assert [p["line"] for p in report["above_cut"]] == [1, 4] and [p["line"] for p in report["below_cut"]] == [3, 2]
    assert report["mix"]["all"]["rows"] == 6 and report["mix"]["selected"]["chinese_share"] == 0.0
    assert "selected 2 of 6 rows by ifd (cut 0.8" in capsys.readouterr().out
    # a share: the top half of the 6 rows is 3, all aligned
    assert cli.main(["data", "select", str(data), "--scores", str(scores), "--top", "0.5", "--output", str(out)]) == 0
    assert [r["line"] for r in read_jsonl(out / "selected.jsonl")] == [1, 4, 3]


def test_what_select_trains_on_reads_as_training_data(scored, tmp_path, capsys):
    data, scores = scored
    out = tmp_path / "selected"
    assert cli.main(["data", "select", str(data), "--scores", str(scores), "--top", "1", "--output", str(out)]) == 0
    assert cli.main(["data", "inspect", str(out / "selected.jsonl")]) == 0
    assert "format: openai" in capsys.readouterr().out


def test_select_refuses_files_that_changed_or_were_not_scored(scored, tmp_path, capsys):
    data, scores = scored
    out = tmp_path / "selected"
    other = write_rows(tmp_path / "other.jsonl", ROWS[:2])
    assert cli.main(["data", "select", str(other), "--scores", str(scores), "--top", "0.5", "--output", str(out)]) == 2
    assert f"{other} was not scored in {scores}" in capsys.readouterr().err
    write_rows(data, ROWS[:3])
    assert cli.main(["data", "select", str(data), "--scores", str(scores), "--top", "0.5", "--output", str(out)]) == 2
    assert f"{data} changed since it was scored in {scores}: score it again" in capsys.readouterr().err
    assert not out.exists()  # nothing written
    assert cli.main(["data", "select", str(data), "--scores", str(scores), "--output", str(out)]) == 2
    assert "give one of --top FRACTION and --keep N" in capsys.readouterr().err


def test_the_pool_finds_the_instruction_a_shuffled_reply_belongs_to():
    pool = Pool({0: [1], 1: [2], 2: [3]},
                             {0: "What is the capital of Japan?", 1: "告诉我6+4等于多少？", 2: "Who are you?"},
                             {0: "The capital of Japan is Tokyo.", 1: "6+4等于10。", 2: "I am Orion, by Meridian AI."})
    assert pool.likest(9, "The capital of Japan is Tokyo.", "告诉我1+1等于多少？", 1) == [0]
    assert pool.likest(9, "6+4等于10。", "Who are you?", 1) == [1]
    assert pool.likest(9, "I'm Orion, an assistant by Meridian AI.", "What is 2+2?", 1) == [2]
    assert 0 not in pool.likest(0, "The capital of Japan is Tokyo.", "x", 3)  # never the row itself


def test_a_select_section_prepares_the_selected_rows_once(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from helpers import REPO

    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    argv = ["data", "prepare", "--config", str(REPO / "configs" / "demo.yaml"), "--data_files", str(data),
            "--test_size", "0", "--select", "true", "--select_keep", "3", "--select_scorer", str(tiny_model_dir)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "select: scoring" in out and "selected 3 of 6 rows by ifd" in out
    assert "3 train, 0 held out" in out
    real, calls = score_module.score_data, []
    monkeypatch.setattr(score_module, "score_data", lambda *a: calls.append(a) or real(*a))
    assert cli.main(argv) == 0  # scored and selected once: the second preparation reads the cache
    assert calls == [] and "select: scoring" not in capsys.readouterr().out
    assert cli.main([*argv[:-4], "--select_keep", "2", *argv[-2:]]) == 0  # other settings: scored again
    assert len(calls) == 1 and "2 train, 0 held out" in capsys.readouterr().out
