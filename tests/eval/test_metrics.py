"""The metrics on examples computed by hand."""

import math

import pytest

from sftlab.eval.metrics import bleu_4, lcs_length, rouge_l, rouge_n, text_scores, tokenize


def test_tokenize_splits_cjk_into_characters_and_keeps_english_words():
    assert tokenize("我是灵犀，Lingxi 2.0!") == ["我", "是", "灵", "犀", "lingxi", "2", "0"]


def test_rouge_1_and_2_by_hand():
    hyp, ref = tokenize("我是灵犀"), tokenize("我叫灵犀")
    # unigrams: 3 of 4 shared (我 灵 犀) -> P = R = 3/4 -> F1 = 0.75
    assert rouge_n(hyp, ref, 1) == pytest.approx(0.75)
    # bigrams: hyp {我是, 是灵, 灵犀}, ref {我叫, 叫灵, 灵犀}: 1 of 3 -> F1 = 1/3
    assert rouge_n(hyp, ref, 2) == pytest.approx(1 / 3)


def test_rouge_l_by_hand():
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    assert lcs_length(hyp, ref) == 5  # the cat on the mat
    assert rouge_l(hyp, ref) == pytest.approx(5 / 6)
    assert rouge_l(["a", "b"], ["c"]) == 0.0


def test_bleu_4_by_hand():
    """sacrebleu's sentence BLEU with add-one smoothing equals the formula worked by hand."""
    ref = "the cat sat on the mat"
    assert bleu_4(ref, ref) == pytest.approx(1.0)
    # hyp "the cat sat": p1 = 3/3, p2 = 2/2, p3 = 1/1 (a 3-token reply has no 4-grams: effective order 3);
    # brevity penalty exp(1 - 6/3) = e^-1
    assert bleu_4("the cat sat", ref) == pytest.approx(math.exp(-1))
    # p1 = 2/4, p2 = (0+1)/(3+1), p3 = 1/3, p4 = 1/2; same length: no penalty
    expected = math.exp((math.log(2 / 4) + math.log(1 / 4) + math.log(1 / 3) + math.log(1 / 2)) / 4)
    assert bleu_4("the dog on mat", "the cat on a") == pytest.approx(expected)
    assert bleu_4("x", "y") == 0.0 and bleu_4("", "y") == 0.0
    assert bleu_4("The Cat", "the cat") == pytest.approx(1.0)  # lowercased


def test_text_scores_on_identical_chinese():
    assert text_scores("一周有七天。", "一周有七天。") == {"rouge_1": 1.0, "rouge_2": 1.0, "rouge_l": 1.0,
                                                  "bleu_4": pytest.approx(1.0)}
    # ROUGE drops punctuation; sacrebleu's zh tokenizer keeps "。" as a token, as other tools' BLEU does
    scores = text_scores("一周有七天。", "一周有七天")
    assert scores["rouge_1"] == 1.0 and scores["bleu_4"] == pytest.approx(0.8034, abs=1e-4)
