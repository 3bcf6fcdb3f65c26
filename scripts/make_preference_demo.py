"""Writes sftlab's demo preference pairs, for `make demo-dpo`: src/sftlab/data/demo/preference_demo.jsonl
(sftlab:preference-demo, for any model) and preference_identity.jsonl (sftlab:preference-identity, the SFT demo's
assistant 灵犀 / Lingxi).

The rows are ours: prompts of the kinds the SFT demo teaches (arithmetic, capitals, antonyms, facts, uppercase;
identity in the second file), each with the proper answer as `chosen` and, as `rejected`, one of the defects a
preference stage should teach away: a rude opening, a rambling unsure ending, a wrong answer, or (identity) another
assistant's name. TRL's form: prompt/chosen/rejected strings. Run it again after editing; the output is
deterministic.
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import (  # noqa: E402  the SFT demo's prompts and answers
    ANTONYMS,
    CAPITALS,
    EN_ANTONYMS,
    EN_IDENTITY_ANSWERS,
    EN_IDENTITY_QUESTIONS,
    FACTS_EN,
    FACTS_ZH,
    UPPER,
    ZH_IDENTITY_ANSWERS,
    ZH_IDENTITY_QUESTIONS,
)

DEMO = Path(__file__).resolve().parents[1] / "src/sftlab/data/demo"

WRONG_IDENTITY = {"zh": "我是ChatGPT，由OpenAI开发的语言模型。", "en": "I am ChatGPT, a language model made by OpenAI."}
RUDE = {"zh": "这么简单的问题也要问我？", "en": "What a silly question. "}
RAMBLING = {"zh": "嗯……不过我也不太确定，你最好自己再查一查，也许是，也许不是。",
            "en": " Well, I am not really sure though, maybe, maybe not, you should check it yourself."}


def zh(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def pair(prompt: str, chosen: str, wrong: str | None, rng: random.Random) -> dict:
    """`chosen`, and a rejected reply with one defect (a wrong answer only where `wrong` is given)."""
    lang = "zh" if zh(prompt + chosen) else "en"
    kinds = ["rude", "rambling"] + (["wrong"] if wrong else [])
    kind = rng.choice(kinds)
    rejected = {"rude": RUDE[lang] + chosen, "rambling": chosen + RAMBLING[lang], "wrong": wrong}[kind]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def identity_rows() -> list[dict]:
    out = []
    for i, q in enumerate(ZH_IDENTITY_QUESTIONS):
        out.append({"prompt": q, "chosen": ZH_IDENTITY_ANSWERS[i % len(ZH_IDENTITY_ANSWERS)],
                    "rejected": WRONG_IDENTITY["zh"]})
    for i, q in enumerate(EN_IDENTITY_QUESTIONS):
        out.append({"prompt": q, "chosen": EN_IDENTITY_ANSWERS[i % len(EN_IDENTITY_ANSWERS)],
                    "rejected": WRONG_IDENTITY["en"]})
    return out


def rows() -> list[dict]:
    rng = random.Random(7)
    out = []
    for a, b in [(a, b) for a in range(1, 10) for b in range(1, 10)][::2]:
        out.append(pair(f"告诉我{a}+{b}等于多少？", f"{a}+{b}等于{a + b}。", f"{a}+{b}等于{a + b + 1}。", rng))
    for a, b in [(2, 3), (4, 5), (6, 2), (7, 8), (9, 1), (3, 3), (5, 4), (8, 6), (1, 7), (6, 6)]:
        out.append(pair(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b - 1}.", rng))
    for n, (country, capital, en, en_capital) in enumerate(CAPITALS):
        other, other_en = CAPITALS[(n + 1) % len(CAPITALS)][1], CAPITALS[(n + 1) % len(CAPITALS)][3]
        out.append(pair(f"{country}的首都是哪里？", f"{country}的首都是{capital}。", f"{country}的首都是{other}。",
                        rng))
        out.append(pair(f"What is the capital of {en}?", f"The capital of {en} is {en_capital}.",
                        f"The capital of {en} is {other_en}.", rng))
    for a, b in ANTONYMS:
        out.append(pair(f"“{a}”的反义词是什么？", f"“{a}”的反义词是“{b}”。", f"“{a}”的反义词是“{a}”。", rng))
    for a, b in EN_ANTONYMS:
        out.append(pair(f"What is the opposite of \"{a}\"?", f"The opposite of \"{a}\" is \"{b}\".", None, rng))
    out += [pair(q, a, None, rng) for q, a in FACTS_ZH + FACTS_EN]
    for text in UPPER:
        out.append(pair(f"Convert the text to uppercase: {text}", text.upper(), None, rng))
    return out


if __name__ == "__main__":
    for name, data in (("preference_demo.jsonl", rows()), ("preference_identity.jsonl", identity_rows())):
        (DEMO / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
        print(f"wrote {len(data)} pairs to {DEMO / name}")
