"""ROUGE-1/2/L and BLEU-4 for Chinese, English and mixed text. BLEU is sacrebleu's (see bleu_4); ROUGE is computed
here, since the common ROUGE packages tokenize English only.

ROUGE's tokenization: each CJK character is one token, and runs of other letters and digits are words (lowercased);
punctuation and spaces are dropped. Characters rather than jieba words, because character n-grams need no
dictionary, cannot disagree between the reference and the reply on where a word ends (jieba segments the
same phrase differently in different contexts), and are the usual unit for Chinese ROUGE/BLEU; English keeps
words, where characters would make every reply look similar.
"""

import functools
import re
from collections import Counter

_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """'我是灵犀, Lingxi 2.0' -> ['我', '是', '灵', '犀', 'lingxi', '2', '0']"""
    return [match.group(0).lower() for match in _TOKEN.finditer(text)]


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: int, hyp_total: int, ref_total: int) -> float:
    if overlap == 0 or hyp_total == 0 or ref_total == 0:
        return 0.0
    precision, recall = overlap / hyp_total, overlap / ref_total
    return 2 * precision * recall / (precision + recall)


def rouge_n(hypothesis: list[str], reference: list[str], n: int) -> float:
    hyp, ref = ngrams(hypothesis, n), ngrams(reference, n)
    return _f1(sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: list[str], reference: list[str]) -> float:
    return _f1(lcs_length(hypothesis, reference), len(hypothesis), len(reference))


BLEU_SIGNATURE = "sacrebleu sentence BLEU-4, tokenize zh, lowercase, add-one smoothing of the 2- to 4-gram precisions"


def bleu_4(hypothesis: str, reference: str) -> float:
    """Sentence BLEU-4 by sacrebleu (so the number can be cited beside other tools'), in [0, 1]: its `zh`
    tokenizer (each CJK character a token, the rest split as 13a does, punctuation included), lowercased, with
    add-one smoothing of the 2- to 4-gram precisions (Lin and Och, 2004: a short reply with no 4-gram match still
    gets a graded score), the orders a short reply has (sacrebleu's effective order) and the usual brevity penalty."""
    if not hypothesis.strip() or not reference.strip():
        return 0.0
    return _bleu().sentence_score(hypothesis, [reference]).score / 100


@functools.cache
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="zh", lowercase=True, smooth_method="add-k", smooth_value=1, effective_order=True)


def text_scores(hypothesis: str, reference: str) -> dict[str, float]:
    hyp, ref = tokenize(hypothesis), tokenize(reference)
    return {"rouge_1": rouge_n(hyp, ref, 1), "rouge_2": rouge_n(hyp, ref, 2), "rouge_l": rouge_l(hyp, ref),
            "bleu_4": bleu_4(hypothesis, reference)}
