"""How well `sftlab data score` flags rows whose reply belongs to another instruction: recall on shuffled rows and
false positives on aligned ones, on data the thresholds were not tuned on.

    .venv/bin/python benchmarks/misaligned_rows.py [--set tuning|held-out] [--scorer sftlab:smollm2-135m]

The thresholds (misaligned_relevance 1.05, misaligned_ratio 1.08) were tuned on `--set tuning`: sftlab's demo data
(177 rows: facts, arithmetic, translation, the Lingxi identity) and 60 rows of the Orion identity set, with every
reply shuffled to another row's instruction. `--set held-out` is data they never saw: general rows written here
(unit conversions, word forms, counting, facts and instructions, English and Chinese, replies of one sentence to a
short list) with the Kestrel and Xiaozhou identity sets. Each set is scored as one data file: its aligned rows,
and a copy of each row with the reply of another row of the set (a seeded derangement; a reply moved from one
identity row to another of the same identity still answers its new question, so those are counted apart, as
neither aligned nor shuffled; one moved to another identity's question contradicts it, and counts as shuffled).
Near-duplicate removal is off, so that every row is scored. Prints the recall, the false positives, the throughput
(rows/s, this machine) and what each test flagged.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "src" / "sftlab" / "data" / "demo"
SETS = REPO / "benchmarks" / "identity_sets"
IDENTITIES = {"Orion": ("Orion",), "Lingxi": ("Lingxi", "灵犀"), "Kestrel": ("Kestrel",),
              "Xiaozhou": ("小舟", "Xiaozhou")}

UNITS = [("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("liters", "milliliters", 1000), ("kilometers", "meters", 1000)]
UNITS_ZH = [("米", "厘米", 100), ("千克", "克", 1000), ("小时", "分钟", 60), ("分钟", "秒", 60), ("升", "毫升", 1000)]
PLURALS = [("child", "children"), ("mouse", "mice"), ("box", "boxes"), ("leaf", "leaves"), ("city", "cities"),
           ("foot", "feet"), ("tooth", "teeth"), ("knife", "knives")]
PAST = [("run", "ran"), ("swim", "swam"), ("write", "wrote"), ("eat", "ate"), ("go", "went"), ("buy", "bought")]
WORDS = ["banana", "window", "elephant", "guitar", "pencil", "orange", "rocket", "garden"]
FACTS = [("How many legs does a spider have?", "A spider has eight legs."),
         ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
         ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
         ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius at sea level."),
         ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
         ("List three primary colors.", "Red, yellow and blue."),
         ("Name two mammals that live in the sea.", "Whales and dolphins."),
         ("Give me a synonym for 'happy'.", "Joyful."),
         ("Write a short greeting for a birthday card.", "Happy birthday! Wishing you a wonderful year ahead."),
         ("Sort these numbers from smallest to largest: 9, 2, 7, 4.", "2, 4, 7, 9.")]
FACTS_ZH = [("蜘蛛有几条腿？", "蜘蛛有八条腿。"), ("植物从空气中吸收什么气体？", "植物从空气中吸收二氧化碳。"),
            ("地球上最大的海洋是哪个？", "太平洋是地球上最大的海洋。"),
            ("水在海平面上多少度沸腾？", "水在海平面上100摄氏度沸腾。"),
            ("哪颗行星被称为红色星球？", "火星被称为红色星球。"), ("列出三种水果。", "苹果、香蕉和橙子。"),
            ("“高兴”的近义词是什么？", "“高兴”的近义词是“快乐”。"), ("写一句新年祝福。", "祝你新年快乐，万事如意！"),
            ("把这些数字从小到大排序：8、3、5。", "3、5、8。"), ("熊猫主要吃什么？", "熊猫主要吃竹子。")]


def general_rows() -> list[dict]:
    rows = []
    for big, small, factor in UNITS:
        for n in (2, 5):
            rows.append((f"How many {small} are in {n} {big}?", f"{n} {big} is {n * factor} {small}."))
    for big, small, factor in UNITS_ZH:
        for n in (3, 4):
            rows.append((f"{n}{big}等于多少{small}？", f"{n}{big}等于{n * factor}{small}。"))
    rows += [(f"What is the plural of '{a}'?", f"The plural of '{a}' is '{b}'.") for a, b in PLURALS]
    rows += [(f"What is the past tense of '{a}'?", f"The past tense of '{a}' is '{b}'.") for a, b in PAST]
    rows += [(f"How many letters are in the word '{w}'?", f"The word '{w}' has {len(w)} letters.") for w in WORDS]
    rows += FACTS + FACTS_ZH
    return [{"instruction": q, "input": "", "output": a} for q, a in rows]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def aligned_rows(which: str) -> list[dict]:
    if which == "tuning":
        demo = json.loads((DEMO / "alpaca_demo.json").read_text(encoding="utf-8"))
        return demo + read_jsonl(SETS / "orion.jsonl")[:60]
    return general_rows() + read_jsonl(DEMO / "identity.jsonl") + read_jsonl(SETS / "xiaozhou.jsonl")


def identity_of(row: dict) -> str | None:
    """The assistant a reply names itself as, if it does."""
    return next((name for name, marks in IDENTITIES.items() if any(m in row["output"] for m in marks)), None)


def with_shuffled(rows: list[dict], seed: int = 0) -> tuple[list[dict], list[str]]:
    """The rows, then each with another row's reply; and each row's kind: aligned (a row of the data), shuffled,
    or moved (an identity reply moved to another question about the same identity, which it still answers)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    moved = [(i, order[i]) for i in range(len(rows)) if order[i] != i
             and rows[order[i]]["output"] != rows[i]["output"]]
    data = rows + [{**rows[i], "output": rows[j]["output"]} for i, j in moved]
    kinds = ["aligned"] * len(rows) + ["moved" if identity_of(rows[i]) and identity_of(rows[i]) == identity_of(rows[j])
                                       else "shuffled" for i, j in moved]
    return data, kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=("tuning", "held-out"), default="held-out")
    parser.add_argument("--scorer", default="sftlab:smollm2-135m")
    parser.add_argument("--save", help="write each row's kind (aligned or shuffled, identity or not) and scores to "
                                       "this JSON file, to study the thresholds")
    args, extra = parser.parse_known_args()
    data, kinds = with_shuffled(aligned_rows(args.set))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.set}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sftlab.cli", "data", "score", str(path), "--output",
                        str(Path(tmp) / "out"), "--scorer", args.scorer, "--near_dedup", "false", *extra],
                       check=True)
        seconds = time.perf_counter() - started
        scores = {r["line"]: r for r in read_jsonl(Path(tmp) / "out" / "scores.jsonl")}
        report = json.loads((Path(tmp) / "out" / "score_report.json").read_text())
    flagged = {kind: [scores[n + 1]["misaligned"] for n, k in enumerate(kinds) if k == kind and n + 1 in scores]
               for kind in ("aligned", "shuffled")}
    if args.save:
        Path(args.save).write_text(json.dumps([{"kind": k, "identity": identity_of(row), **scores[n + 1]}
                                               for n, (k, row) in enumerate(zip(kinds, data)) if n + 1 in scores]))
    for identity in (False, True):
        part = [scores[n + 1]["misaligned"] for n, (k, row) in enumerate(zip(kinds, data))
                if k == "aligned" and bool(identity_of(row)) == identity and n + 1 in scores]
        print(f"aligned {'identity' if identity else 'other'} rows flagged: {sum(part)} of {len(part)}")
    moved = [scores[n + 1]["misaligned"] for n, k in enumerate(kinds) if k == "moved" and n + 1 in scores]
    print(f"identity replies moved to another question about the same identity (neither aligned nor shuffled, "
          f"left out of both rates) flagged: {sum(moved)} of {len(moved)}")
    recall = sum(flagged["shuffled"]) / len(flagged["shuffled"])
    false_positives = sum(flagged["aligned"]) / len(flagged["aligned"])
    print(f"\nset {args.set}: {len(flagged['aligned'])} aligned rows, {len(flagged['shuffled'])} shuffled; scorer "
          f"{args.scorer}; settings {report['settings']}")
    print(f"flagged misaligned: {recall:.1%} of shuffled rows (recall), {false_positives:.1%} of aligned rows "
          f"(false positives); by test {report['misaligned_by']}")
    print(f"throughput: {report['rows']} rows in {report['seconds']} s of scoring = {report['rows_per_second']} "
          f"rows/s ({seconds:.0f} s with cleaning and loading)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
