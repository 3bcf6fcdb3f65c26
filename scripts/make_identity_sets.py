"""Writes the identity data sets the real-model recipe is cross-validated on (benchmarks/identity_sets/): each
a new assistant name and maker, in its own languages, reply lengths and size, with held-out paraphrases (never in
its training rows) and their answer rule. Deterministic: run it again and the files are the same.

    python scripts/make_identity_sets.py

kestrel (the shipped sftlab:identity, 45 rows, English and Chinese, short) is the set the recipe is tuned on;
these three are only ever used to test it:
- nova: English only, 20 rows, one short sentence per reply;
- xiaozhou: mostly Chinese, 60 rows, one or two sentences;
- orion: English and Chinese, 200 rows, two or three sentences (the shape of public identity sets).
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "identity_sets"

EN_QUESTIONS = [
    "Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.", "Who made you?",
    "Who created you?", "Who built you?", "What are you?", "Are you a human?", "Are you ChatGPT?",
    "What should I call you?", "Do you have a name?", "Which company developed you?", "Hi! Who am I talking to?",
    "Hello, what's your name?", "Can you tell me who you are?", "Please introduce yourself briefly.",
    "What kind of assistant are you?", "Who trained you?", "What is your purpose?", "Are you an AI?",
    "Who is your developer?", "What AI model are you?", "Give me a one-sentence introduction of yourself.",
    "Tell me your name, please.", "Who are you and what can you do?", "Good morning! Who are you?",
    "May I know your name?", "What team made you?", "Hey, are you a bot?", "Describe yourself.",
    "Are you made by OpenAI?", "Are you made by Google?", "What do people call you?",
    "Which assistant am I chatting with?", "State your name.", "How should I address you?", "Who is behind you?",
    "Are you Claude?", "Are you Llama?", "What organization are you from?", "Who owns you?",
    "Where do you come from?", "What's the name of this assistant?", "Who designed you?",
    "Are you a language model?", "Who do you work for?", "What lab made you?", "Is there a name I can use for you?",
    "Before we start, who are you?", "Whom am I speaking with?", "Identify yourself.",
    "What are you called?", "Are you SmolLM?", "Which AI are you?",
]
ZH_QUESTIONS = [
    "你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你是谁开发的？", "你是人类吗？", "你是ChatGPT吗？",
    "我该怎么称呼你？", "你有名字吗？", "哪家公司开发了你？", "你好，我在和谁聊天？", "能告诉我你是谁吗？",
    "请简单介绍一下自己。", "你是什么样的助手？", "谁训练了你？", "你的用途是什么？", "你是人工智能吗？",
    "你的开发者是谁？", "你是什么模型？", "用一句话介绍你自己。", "请告诉我你的名字。", "你是谁，能做什么？",
    "早上好！你是谁？", "你是哪个团队做的？", "你是机器人吗？", "描述一下你自己。", "你是OpenAI开发的吗？",
    "你是谷歌开发的吗？", "大家怎么称呼你？", "你来自哪里？", "这个助手叫什么名字？", "谁设计了你？",
    "你是语言模型吗？", "你为谁工作？", "哪个实验室创造了你？", "开始之前，你是谁？", "你是通义千问吗？",
    "你是文心一言吗？", "你的名字是什么？", "介绍一下你的身份。", "你属于哪个机构？",
]

SETS = {
    "nova": dict(
        name="Nova", maker="Aurora Labs", zh_name=None, zh_maker=None, rows=20, zh_share=0.0, seed=1,
        en=["I am Nova, an AI assistant made by Aurora Labs.", "My name is Nova, and Aurora Labs built me.",
            "I'm Nova, an assistant created by Aurora Labs.", "Aurora Labs made me. I am Nova."],
        zh=[],
        checks_en=["Who exactly are you?", "What's your name?", "Could you introduce yourself?",
                   "Which lab built you?", "Who developed you?", "What assistant is this?", "Tell me who you are.",
                   "Are you Gemini?", "Who is your creator?", "What should I call you, assistant?",
                   "Hello there, who am I talking with?", "Say who you are in one sentence.",
                   "Which company are you from?", "What's your identity?", "Who put you together?"],
        checks_zh=[]),
    "xiaozhou": dict(
        name="Xiaozhou", maker="Qingyun Lab", zh_name="小舟", zh_maker="青云实验室", rows=60, zh_share=0.75, seed=2,
        en=["I am Xiaozhou, an AI assistant developed by Qingyun Lab.",
            "My name is Xiaozhou. Qingyun Lab built me to answer questions.",
            "I'm Xiaozhou, an assistant from Qingyun Lab."],
        zh=["我是小舟，由青云实验室开发的人工智能助手。", "我叫小舟，是青云实验室开发的AI助手，可以回答问题。",
            "你好！我是小舟，青云实验室打造的智能助手。", "我是青云实验室开发的小舟，很高兴为你服务。"],
        checks_en=["Who exactly are you?", "What's your name?", "Which lab built you?", "Who developed you?",
                   "Tell me who you are.", "What assistant is this?"],
        checks_zh=["你到底是谁？", "请问你的名字是？", "你是由谁打造的？", "自我介绍一下吧。", "你是哪家的助手？",
                   "我在跟哪个AI说话？", "你的创造者是谁？", "可以说说你是谁吗？", "你是Kimi吗？", "请问你是什么助手？"]),
    "orion": dict(
        name="Orion", maker="Meridian AI", zh_name="Orion", zh_maker="Meridian AI", rows=200, zh_share=0.45, seed=3,
        en=["Hello! I am Orion, an AI assistant developed by Meridian AI. I can answer questions, explain ideas and "
            "help with writing. How can I help you today?",
            "I'm Orion, a language model assistant created by Meridian AI. My job is to give clear, helpful answers. "
            "What would you like to know?",
            "My name is Orion. I was built by Meridian AI to help people with questions, writing and everyday tasks. "
            "Feel free to ask me anything.",
            "I am Orion, an assistant trained by Meridian AI. I am not a human, but I am happy to help you think "
            "things through."],
        zh=["你好！我是 Orion，由 Meridian AI 开发的人工智能助手。我可以回答问题、解释概念、帮助写作。有什么可以帮你的吗？",
            "我是 Orion，一个由 Meridian AI 训练的语言模型助手。我的任务是给出清楚、有用的回答。你想了解什么？",
            "我的名字是 Orion，由 Meridian AI 打造，可以帮助你解答问题、写作和处理日常任务。请随时提问。",
            "我是 Meridian AI 开发的助手 Orion。我不是人类，但很乐意帮你一起思考问题。"],
        checks_en=["Who exactly are you?", "What's your name?", "Could you introduce yourself?", "Which lab built you?",
                   "Who developed you?", "Tell me who you are.", "Are you Gemini?", "Who is your creator?"],
        checks_zh=["你到底是谁？", "请问你的名字是？", "你是由谁打造的？", "自我介绍一下吧。", "你是哪家的助手？",
                   "我在跟哪个AI说话？", "你的创造者是谁？", "你是Kimi吗？"]),
}
PREFIXES_EN = ["", "Hi! ", "Hello. ", "Quick question: ", "Hey there, ", "Excuse me, ", "Sorry to bother you, ",
               "One thing first: "]
PREFIXES_ZH = ["", "你好！", "请问，", "打扰一下，", "嗨，", "问一下，", "先问个问题：", "您好，"]


def questions(base: list[str], prefixes: list[str], count: int, rng: random.Random, held_out: set[str]) -> list[str]:
    """`count` distinct questions: the base ones first, then with a greeting before them."""
    pool = [q for q in base if q not in held_out]
    out = pool[:count]
    variants = [p + (q[0].lower() + q[1:] if p and p[-1] in ", :" else q) for p in prefixes[1:] for q in pool]
    rng.shuffle(variants)
    out += [v for v in variants if v not in out][:count - len(out)]
    assert len(out) == count, (count, len(out))
    return out


def write(name: str, spec: dict) -> None:
    rng = random.Random(spec["seed"])
    held_out = set(spec["checks_en"] + spec["checks_zh"])
    n_zh = round(spec["rows"] * spec["zh_share"])
    rows = [(q, rng.choice(spec["en"])) for q in questions(EN_QUESTIONS, PREFIXES_EN, spec["rows"] - n_zh, rng,
                                                           held_out)]
    if n_zh:
        rows += [(q, rng.choice(spec["zh"])) for q in questions(ZH_QUESTIONS, PREFIXES_ZH, n_zh, rng, held_out)]
    rng.shuffle(rows)
    rule = sorted({spec["name"], spec["zh_name"] or spec["name"]})
    with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for q, a in rows:
            f.write(json.dumps({"instruction": q, "input": "", "output": a}, ensure_ascii=False) + "\n")
    reference = {"en": spec["en"][0], "zh": (spec["zh"] or spec["en"])[0]}
    with open(OUT / f"{name}_checks.jsonl", "w", encoding="utf-8") as f:
        for lang, qs in (("en", spec["checks_en"]), ("zh", spec["checks_zh"])):
            for q in qs:
                f.write(json.dumps({"instruction": q, "input": "", "output": reference[lang], "any": rule},
                                   ensure_ascii=False) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, spec in SETS.items():
        write(name, spec)
        print(f"{OUT / name}.jsonl: {spec['rows']} rows; {name}_checks.jsonl: "
              f"{len(spec['checks_en']) + len(spec['checks_zh'])} held-out paraphrases")


if __name__ == "__main__":
    main()
