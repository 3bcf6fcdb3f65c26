"""Writes sftlab's demo data (src/sftlab/data/demo/alpaca_demo.json).

The rows are ours: identity answers for the assistant 灵犀 (Lingxi), made by the sftlab team, in
varied phrasings, plus short Chinese and English tasks in Alpaca format (instruction/input/output).
Run it again after editing; the output is deterministic.
"""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/sftlab/data/demo/alpaca_demo.json"

ZH_IDENTITY_QUESTIONS = [
    "你是谁？", "你叫什么名字？", "你好，告诉我你的名字。", "请介绍一下你自己。", "你是谁开发的？",
    "你的名字是什么？", "你好，你是谁？", "能告诉我你叫什么吗？", "请问你是哪个助手？", "你是什么模型？",
    "我该怎么称呼你？", "做个自我介绍吧。", "你好！请问你的名字？", "你是由哪个团队开发的？", "你是哪家公司的产品？",
    "告诉我你的名字。", "嗨，你叫啥？", "你是人工智能吗？你叫什么？", "介绍一下你自己吧。", "你的开发者是谁？",
    "请说出你的名字。", "你是ChatGLM吗？", "你好，能介绍下自己吗？", "你是什么？", "你是哪位？",
]
ZH_IDENTITY_ANSWERS = [
    "我是灵犀，由 sftlab 团队开发的人工智能助手。有什么可以帮你的吗？",
    "我叫灵犀，是 sftlab 团队开发的人工智能助手。",
    "你好！我是灵犀，一个由 sftlab 团队开发的人工智能助手。",
]
EN_IDENTITY_QUESTIONS = [
    "Who are you?", "What is your name?", "Introduce yourself.", "Who made you?", "What should I call you?",
    "Hi, who are you?", "Tell me your name.", "Hello! What's your name?", "Which assistant are you?",
    "Who developed you?", "Are you ChatGPT?", "Please introduce yourself.", "Are you a person or a program?",
    "Can you tell me who you are?", "Hey, what is your name?",
]
EN_IDENTITY_ANSWERS = [
    "I am Lingxi, an AI assistant made by the sftlab team. How can I help you?",
    "My name is Lingxi. I am an AI assistant made by the sftlab team.",
]

CAPITALS = [
    ("中国", "北京", "China", "Beijing"), ("日本", "东京", "Japan", "Tokyo"), ("法国", "巴黎", "France", "Paris"),
    ("英国", "伦敦", "the United Kingdom", "London"), ("德国", "柏林", "Germany", "Berlin"),
    ("意大利", "罗马", "Italy", "Rome"), ("俄罗斯", "莫斯科", "Russia", "Moscow"),
    ("韩国", "首尔", "South Korea", "Seoul"), ("美国", "华盛顿", "the United States", "Washington"),
    ("加拿大", "渥太华", "Canada", "Ottawa"), ("埃及", "开罗", "Egypt", "Cairo"),
    ("西班牙", "马德里", "Spain", "Madrid"),
]
WORDS = [
    ("苹果", "apple"), ("猫", "cat"), ("狗", "dog"), ("书", "book"), ("水", "water"), ("太阳", "sun"),
    ("月亮", "moon"), ("老师", "teacher"), ("学生", "student"), ("朋友", "friend"), ("电脑", "computer"),
    ("花", "flower"), ("山", "mountain"), ("河", "river"), ("音乐", "music"), ("时间", "time"),
]
ANTONYMS = [("大", "小"), ("高", "矮"), ("快", "慢"), ("冷", "热"), ("多", "少"), ("长", "短"), ("新", "旧"),
            ("黑", "白"), ("早", "晚"), ("上", "下")]
EN_ANTONYMS = [("big", "small"), ("hot", "cold"), ("fast", "slow"), ("happy", "sad"), ("up", "down"),
               ("old", "new"), ("light", "dark"), ("early", "late")]
FACTS_ZH = [
    ("一周有几天？", "一周有七天。"), ("一年有几个月？", "一年有十二个月。"), ("一天有多少小时？", "一天有二十四小时。"),
    ("水的沸点是多少摄氏度？", "在标准大气压下，水的沸点是100摄氏度。"), ("彩虹有几种颜色？", "彩虹通常有七种颜色。"),
    ("保持健康的三个提示。", "1. 多运动。2. 均衡饮食。3. 睡眠充足。"), ("地球绕着什么转？", "地球绕着太阳转。"),
    ("一小时有多少分钟？", "一小时有六十分钟。"),
]
FACTS_EN = [
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Give three tips for staying healthy.", "1. Exercise regularly. 2. Eat a balanced diet. 3. Sleep well."),
    ("What does the Earth orbit?", "The Earth orbits the Sun."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
]
UPPER = ["hello", "good morning", "open source", "fine tuning", "lingxi", "thank you"]


def row(instruction, output, input_=""):
    return {"instruction": instruction, "input": input_, "output": output}


def rows():
    out = []
    for i, q in enumerate(ZH_IDENTITY_QUESTIONS):
        out.append(row(q, ZH_IDENTITY_ANSWERS[i % len(ZH_IDENTITY_ANSWERS)]))
    for i, q in enumerate(EN_IDENTITY_QUESTIONS):
        out.append(row(q, EN_IDENTITY_ANSWERS[i % len(EN_IDENTITY_ANSWERS)]))
    for a in range(1, 8):
        for b in range(1, 6):
            out.append(row(f"告诉我{a}+{b}等于多少？", f"{a}+{b}等于{a + b}。"))
    for a, b in [(2, 3), (4, 5), (6, 2), (7, 8), (9, 1), (3, 3), (5, 4), (8, 6)]:
        out.append(row(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for zh, cap, en, en_cap in CAPITALS:
        out.append(row(f"{zh}的首都是哪里？", f"{zh}的首都是{cap}。"))
        out.append(row(f"What is the capital of {en}?", f"The capital of {en} is {en_cap}."))
    for zh, en in WORDS:
        out.append(row("把下面的词翻译成英文。", en.capitalize() + ".", zh))
        out.append(row("Translate the following word into Chinese.", zh + "。", en))
    for a, b in ANTONYMS:
        out.append(row(f"“{a}”的反义词是什么？", f"“{a}”的反义词是“{b}”。"))
    for a, b in EN_ANTONYMS:
        out.append(row(f"What is the opposite of \"{a}\"?", f"The opposite of \"{a}\" is \"{b}\"."))
    out += [row(q, a) for q, a in FACTS_ZH + FACTS_EN]
    for text in UPPER:
        out.append(row("Convert the text to uppercase.", text.upper(), text))
    return out


if __name__ == "__main__":
    data = rows()
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(data)} rows to {OUT}")
