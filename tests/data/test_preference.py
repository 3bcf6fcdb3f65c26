"""Preference pairs: every form read into the same pair, every defect counted with its reason and its file and
line, the golden token layout of a pair in each tiny family, and the batch DPO trains on (TRL's collator) masking
exactly the replies."""

import json

import pytest

from sftlab.chat_format import ChatRenderer
from sftlab.data.convert import FieldError
from sftlab.data.load import iter_source
from sftlab.data.preference import PAIR_FIELDS, PAIR_REASONS, Pair, PairDefect, pair_of, prepare_pairs, render_pair
from sftlab.data.sources import dataset_specs, iter_datasets
from sftlab.eval.preference import collate_pairs
from sftlab.model.load import load_tokenizer, resolve_model_path

Q, A, B = "What is 2+2?", "4.", "Five."
USER, CHOSEN, REJECTED = {"role": "user", "content": Q}, {"role": "assistant", "content": A}, \
    {"role": "assistant", "content": B}

FORMS = {
    "trl strings": {"prompt": Q, "chosen": A, "rejected": B},
    "trl messages": {"prompt": [USER], "chosen": [CHOSEN], "rejected": [REJECTED]},
    "trl implicit prompt": {"chosen": [USER, CHOSEN], "rejected": [USER, REJECTED]},
    "llama-factory sharegpt": {"conversations": [{"from": "human", "value": Q}], "chosen": {"from": "gpt", "value": A},
                               "rejected": {"from": "gpt", "value": B}},
    "openai messages": {"messages": [USER], "chosen": CHOSEN, "rejected": REJECTED},
    "alpaca": {"instruction": Q, "input": "", "chosen": A, "rejected": B},
    "alpaca output pair": {"instruction": Q, "input": "", "output": [A, B]},
}


@pytest.mark.parametrize("form", FORMS)
def test_every_form_reads_into_the_same_pair(form):
    assert pair_of(FORMS[form]) == Pair([USER], CHOSEN, REJECTED)


def test_a_system_message_and_history_stay_in_the_prompt():
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                             {"from": "human", "value": Q}], "system": "Be brief.", "chosen": A, "rejected": B}
    assert pair_of(row).prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello."}, USER]
    assert pair_of({"prompt": Q, "chosen": A, "rejected": B}, system_prompt="S").prompt == [
        {"role": "system", "content": "S"}, USER]


@pytest.mark.parametrize(("row", "reason", "detail"), [
    ({"prompt": Q, "chosen": A, "rejected": A}, "identical_sides", "chosen and rejected are the same reply"),
    ({"prompt": Q, "chosen": " ", "rejected": B}, "empty_side", "chosen is empty"),
    ({"prompt": Q, "chosen": A, "rejected": ""}, "empty_side", "rejected is empty"),
    ({"chosen": [USER, CHOSEN], "rejected": [{"role": "user", "content": "Other?"}, REJECTED]}, "prompt_mismatch",
     "the chosen and rejected conversations differ before the reply (at message 0)"),
])
def test_pair_defects_have_their_reason(row, reason, detail):
    with pytest.raises(PairDefect) as caught:
        pair_of(row)
    assert (caught.value.reason, caught.value.detail) == (reason, detail)


def test_a_missing_side_names_the_field():
    with pytest.raises(FieldError, match="field 'rejected': missing"):
        pair_of({"prompt": Q, "chosen": A})


GOLDEN = {  # prompt | chosen | rejected, decoded: the prompt is the generation prompt, each reply ends on its stop
    "sftlab:tiny-glm4": (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello.<|user|>\n2+2?<|assistant|>",
        "\n4.<|endoftext|>", "\nFive, I think.<|endoftext|>"),
    "sftlab:tiny-glm4-0414": (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello.<|user|>\n2+2?<|assistant|>",
        "\n4.<|endoftext|>", "\nFive, I think.<|endoftext|>"),
    "sftlab:tiny-qwen3": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello."
        "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",  # history: no think block
        "<think>\n\n</think>\n\n4.<|im_end|>", "<think>\n\n</think>\n\nFive, I think.<|im_end|>"),
    "sftlab:tiny-llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "4.<|eot_id|>", "Five, I think.<|eot_id|>"),
}


@pytest.mark.parametrize("family", GOLDEN)
def test_golden_pair_layout_per_family(family, sftlab_home):
    tokenizer = load_tokenizer(resolve_model_path(family))
    renderer = ChatRenderer(tokenizer)
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                             {"from": "human", "value": "2+2?"}], "system": "Be brief.",
           "chosen": {"from": "gpt", "value": "4."}, "rejected": {"from": "gpt", "value": "Five, I think."}}
    pair = pair_of(row)
    rendered = render_pair(renderer, pair)
    assert tuple(tokenizer.decode(rendered[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")) == GOLDEN[family]
    # the prompt is exactly what chat and serve send the model, and each reply ends on a stop token
    assert rendered["prompt_ids"] == renderer.prompt_ids(pair.prompt)
    assert rendered["chosen_ids"][-1] in renderer.stop_ids and rendered["rejected_ids"][-1] in renderer.stop_ids


def test_trls_collator_masks_exactly_the_replies_and_keeps_pairs_together(tokenizer):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    renderer = ChatRenderer(tokenizer)
    pairs = [render_pair(renderer, pair_of(row)) for row in (FORMS["trl strings"],
                                                             {"prompt": "Who are you?", "chosen": "I am Lingxi.",
                                                              "rejected": "I am ChatGPT, made by OpenAI."})]
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(pairs)
    assert {k: v.tolist() for k, v in batch.items()} == {k: v.tolist() for k, v in
                                                         collate_pairs(pairs, tokenizer.pad_token_id).items()}
    # rows: pair 0 chosen, pair 1 chosen, pair 0 rejected, pair 1 rejected; the mask covers the reply alone
    for row, (pair, side) in enumerate([(0, "chosen_ids"), (1, "chosen_ids"), (0, "rejected_ids"),
                                        (1, "rejected_ids")]):
        ids, mask = batch["input_ids"][row].tolist(), batch["completion_mask"][row].tolist()
        assert [i for i, m in zip(ids, mask) if m] == pairs[pair][side]
        assert ids[:len(pairs[pair]["prompt_ids"])] == pairs[pair]["prompt_ids"]


def bad_rows_file(path, copies: int = 1) -> dict:
    """A JSONL file with every kind of bad preference row among good ones; the reasons it must give."""
    lines, expected = [], {}

    def add(line, reason=None):
        lines.append(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False))
        if reason:
            expected[reason] = expected.get(reason, 0) + 1

    for n in range(copies):
        add({"prompt": f"Question {n}?", "chosen": f"Answer {n}.", "rejected": f"Rude answer {n}!"})
        add({"instruction": f"Task {n}", "input": "", "chosen": "Done.", "rejected": "No."})
        add({"conversations": [{"from": "human", "value": f"Hi {n}"}], "chosen": {"from": "gpt", "value": "Hello."},
             "rejected": {"from": "gpt", "value": "Go away."}})
        add('{"prompt": "broken', "bad_json")
        add({"prompt": f"Only chosen {n}", "chosen": "x"}, "malformed_record")
        add({"prompt": f"Same {n}", "chosen": "y", "rejected": "y"}, "identical_sides")
        add({"prompt": f"Empty {n}", "chosen": "", "rejected": "z"}, "empty_side")
        add({"chosen": [{"role": "user", "content": f"A{n}"}, CHOSEN],
             "rejected": [{"role": "user", "content": f"B{n}"}, REJECTED]}, "prompt_mismatch")
        add({"prompt": f"Question {n}?", "chosen": f"Answer {n}.", "rejected": f"Rude answer {n}!"}, "duplicate_pair")
        add({"prompt": f"Long {n}", "chosen": "word " * 300, "rejected": "no"}, "too_long")
        add({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "role_order")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return expected


def test_every_bad_row_is_counted_with_its_reason_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    expected = bad_rows_file(path)
    assert set(PAIR_REASONS) <= set(expected)  # every reason a pair can have is planted
    data = prepare_pairs(iter_source(str(path)), ChatRenderer(tokenizer, max_length=128), None, 0.0, 42)
    assert data.report["reasons"] == {reason: 1 for reason in expected}
    assert (data.report["rows_read"], data.report["kept"], data.report["rejected"]) == (11, 3, 8)
    assert data.report["pair_formats"] == {"trl": 1, "alpaca": 1, "sharegpt": 1}
    assert [(r["line"], r["reason"]) for r in data.rejected] == [
        (4, "bad_json"), (5, "malformed_record"), (6, "identical_sides"), (7, "empty_side"), (8, "prompt_mismatch"),
        (9, "duplicate_pair"), (10, "too_long"), (11, "role_order")]
    assert all(r["source"] == str(path) for r in data.rejected)
    assert data.rejected[6]["detail"].startswith("chosen: ") and "> max_length 128" in data.rejected[6]["detail"]


def test_the_split_is_seeded_and_holds_out_whole_pairs(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{n}?", "chosen": f"A{n}.", "rejected": f"B{n}!"}) + "\n"
                            for n in range(20)))
    renderer = ChatRenderer(tokenizer)
    first, again = (prepare_pairs(iter_source(str(path)), renderer, None, 0.25, 7) for _ in range(2))
    assert (len(first.train), len(first.test), len(first.heldout)) == (15, 5, 5)
    assert first.test == again.test and first.heldout == again.heldout
    assert [render_pair(renderer, Pair.from_record(r)) for r in first.heldout] == \
        first.test
    assert not {json.dumps(p) for p in first.train} & {json.dumps(p) for p in first.test}


@pytest.mark.slow
def test_twenty_two_thousand_rows_with_every_defect_are_each_counted(tmp_path, tokenizer):
    """The path a real preference file takes: 22,000 rows, 2,000 of each defect among 6,000 good pairs."""
    path = tmp_path / "pairs.jsonl"
    expected = bad_rows_file(path, copies=2000)
    data = prepare_pairs(iter_source(str(path)), ChatRenderer(tokenizer, max_length=128), None, 0.05, 42)
    assert data.report["reasons"] == {reason: 2000 for reason in expected}
    assert (data.report["rows_read"], data.report["kept"], data.report["rejected"]) == (22000, 6000, 16000)
    assert (len(data.train), len(data.test)) == (5700, 300) and len(data.rejected) == 16000
    assert data.report["tokens"]["total"]["n"] == 6000


def test_dataset_options_apply_to_pairs_columns_and_weights(tmp_path, tokenizer):
    """A dataset's `columns` map its names onto the pair fields, and its weight repeats its training pairs."""
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps({"question": f"Q{n}?", "good": f"A{n}.", "bad": f"B{n}!"}) + "\n"
                             for n in range(4)))
    second.write_text("".join(json.dumps({"prompt": f"R{n}?", "chosen": f"C{n}.", "rejected": f"D{n}!"}) + "\n"
                              for n in range(3)))
    specs = dataset_specs([{"path": str(first), "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"},
                            "weight": 2}, str(second)], PAIR_FIELDS)
    stats = {}
    data = prepare_pairs(iter_datasets(specs, 42, stats), ChatRenderer(tokenizer), None, 0.0, 42, stats)
    assert data.report["kept"] == 7 and len(data.train) == 11  # 4 pairs twice, 3 once
    with pytest.raises(Exception, match="columns: answer is not a field sftlab reads"):
        dataset_specs([{"path": str(first), "columns": {"answer": "good"}}], PAIR_FIELDS)


def test_data_inspect_shows_pairs_as_dpo_sees_them(tmp_path, capsys, tiny_model_dir):
    from sftlab.cli import main

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "你是谁？", "chosen": "我是灵犀。", "rejected": "我是ChatGPT。"}) + "\n"
                    + json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}) + "\n", encoding="utf-8")
    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "preference data: 2 rows read, 1 pairs kept (trl 1), 1 rejected (identical_sides 1)" in out
    assert "[gMASK]<sop><|user|>\n你是谁？<|assistant|>\nchosen (" in out
    assert "«\n我是灵犀。<|endoftext|>»" in out and "«\n我是ChatGPT。<|endoftext|>»" in out
    assert f"--- {path}:2: not usable: identical_sides: chosen and rejected are the same reply" in out


def test_text_is_repaired_as_sft_cleaning_repairs_it_before_the_pair_is_checked(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q\r\n?", "chosen": "  4.\u200b", "rejected": "Five."}) + "\n"
                    + json.dumps({"prompt": "R?", "chosen": "Same.", "rejected": " Same. \r\n"}) + "\n")
    data = prepare_pairs(iter_source(str(path)), ChatRenderer(tokenizer), None, 0.0, 42)
    assert data.report["repairs"] == {"invisible_spaces": 1, "line_endings": 2, "surrounding_whitespace": 2}
    assert data.report["reasons"] == {"identical_sides": 1}  # equal once repaired
    assert tokenizer.decode(data.train[0]["chosen_ids"]) == "\n4.<|endoftext|>"
    assert "repaired in place: invisible_spaces 1, line_endings 2, surrounding_whitespace 2" in data.summary()
