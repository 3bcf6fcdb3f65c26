"""Tool calls on the real embedded model: does tuning on tool-call data teach SmolLM2-135M-Instruct, whose chat
template renders no tools, to call the offered tools in sftlab's fallback form? Base against tuned, on held-out
prompts (other wordings, other values) whose right answer is a call:

    .venv/bin/python benchmarks/tool_calls_real.py [--steps 80] [--train_rows 240] [--learning_rate 5e-4]

The data is generated here from four tools we wrote (weather, currency conversion, timers, recipes), seeded:
each training conversation offers two or three of them, the user asks, the assistant calls the right one, the
result comes back and the assistant answers from it; one row in five asks something no tool is for, answered
directly. The run uses configs/smollm2-135m-lora.yaml (the real-model recipe) on this data, with an empty system
prompt beside the tools (no identity, no template default), as the prompts below are asked.

Scored per held-out prompt, on the first greedy reply (up to 96 new tokens):
  well-formed: the reply is a call in the fallback form of a tool that was offered, with all its required
               arguments (what an agent framework can act on);
  right:       well-formed, the tool the prompt needs, and each required argument's value as asked;
  no call:     for the prompts no tool is for, the reply is not a call (calling anyway is wrong).
About 10 minutes on 2 cores (training about 3, the rest generation).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = {
    "get_weather": {"description": "Current weather for a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
        "required": ["city"]}},
    "convert_currency": {"description": "Convert an amount of money between currencies.", "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}, "from_currency": {"type": "string"},
                                         "to_currency": {"type": "string"}},
        "required": ["amount", "from_currency", "to_currency"]}},
    "set_timer": {"description": "Start a countdown timer.", "parameters": {
        "type": "object", "properties": {"minutes": {"type": "integer"}, "label": {"type": "string"}},
        "required": ["minutes"]}},
    "find_recipe": {"description": "Find a recipe for a dish.", "parameters": {
        "type": "object", "properties": {"dish": {"type": "string"}}, "required": ["dish"]}},
}
CITIES = (["Paris", "Tokyo", "Berlin", "Madrid", "Toronto", "Sydney", "Cairo", "Lima", "Oslo", "Seoul", "Dublin",
           "Nairobi", "Lisbon", "Vienna", "Chicago", "Mumbai"], ["Rome", "Boston", "Prague", "Denver", "Athens"])
CURRENCIES = (["USD", "EUR", "JPY", "GBP", "CNY", "CAD"], ["CHF", "AUD"])
DISHES = (["pancakes", "lasagna", "fried rice", "tomato soup", "apple pie", "guacamole", "falafel", "omelette"],
          ["risotto", "banana bread", "curry"])
ASK = {  # (training wordings, held-out wordings)
    "get_weather": (["What's the weather in {city}?", "How is the weather in {city} today?",
                     "Is it raining in {city}?", "Tell me the weather for {city}.", "Weather in {city}, please."],
                    ["Could you check the current weather in {city}?",
                     "I'm going to {city}. What's it like there now?"]),
    "convert_currency": (["Convert {amount} {frm} to {to}.", "How much is {amount} {frm} in {to}?",
                          "What is {amount} {frm} worth in {to}?", "Change {amount} {frm} into {to}."],
                         ["I have {amount} {frm}. How many {to} is that?", "Exchange {amount} {frm} to {to} for me."]),
    "set_timer": (["Set a timer for {minutes} minutes.", "Start a {minutes} minute timer.",
                   "Remind me in {minutes} minutes.", "Timer: {minutes} minutes, please."],
                  ["Count down {minutes} minutes for me.", "Can you time {minutes} minutes?"]),
    "find_recipe": (["Find me a recipe for {dish}.", "How do I make {dish}?", "I want to cook {dish}.",
                     "Give me a {dish} recipe."],
                    ["What's a good way to prepare {dish}?", "Look up how to cook {dish}."]),
}
NO_TOOL = ([("What is 6 times 4?", "6 times 4 is 24."), ("Name a yellow fruit.", "The banana is a yellow fruit."),
            ("What is the opposite of up?", "The opposite of up is down."),
            ("Translate 'good night' into French.", "'Good night' in French is 'bonne nuit'."),
            ("How many hours are in a day?", "There are 24 hours in a day."),
            ("Spell the word 'dog' backwards.", "'dog' backwards is 'god'.")],
           [("What is 11 plus 5?", ""), ("Which animal says 'moo'?", ""), ("How many wheels does a bicycle have?", "")])


def call_for(tool: str, held_out: bool, rng: random.Random) -> tuple[str, dict, str, str]:
    """(prompt, arguments, tool result, final answer) for one request to `tool`."""
    side = 1 if held_out else 0
    wording = rng.choice(ASK[tool][side])
    if tool == "get_weather":
        city = rng.choice(CITIES[side])
        degrees = rng.randint(-5, 32)
        return (wording.format(city=city), {"city": city}, json.dumps({"city": city, "celsius": degrees,
                                                                        "sky": "clear"}),
                f"It is {degrees} °C and clear in {city}.")
    if tool == "convert_currency":
        frm, to = rng.sample(CURRENCIES[0] if not held_out else CURRENCIES[0] + CURRENCIES[1], 2)
        amount = rng.choice([5, 20, 50, 100, 250, 1000])
        value = round(amount * rng.uniform(0.5, 2.0), 2)
        return (wording.format(amount=amount, frm=frm, to=to),
                {"amount": amount, "from_currency": frm, "to_currency": to}, json.dumps({"result": value}),
                f"{amount} {frm} is about {value} {to}.")
    if tool == "set_timer":
        minutes = rng.choice([1, 2, 3, 5, 10, 15, 20, 25, 30, 45, 60])
        return (wording.format(minutes=minutes), {"minutes": minutes}, json.dumps({"status": "started"}),
                f"Your {minutes}-minute timer is running.")
    dish = rng.choice(DISHES[side])
    return (wording.format(dish=dish), {"dish": dish}, json.dumps({"title": dish, "steps": 5}),
            f"I found a {dish} recipe with 5 steps.")


def offered(tool: str | None, rng: random.Random) -> list[dict]:
    others = [name for name in TOOLS if name != tool]
    names = ([tool] if tool else []) + rng.sample(others, rng.choice([1, 2]))
    rng.shuffle(names)
    return [{"type": "function", "function": {"name": n, **TOOLS[n]}} for n in names]


def training_rows(count: int, rng: random.Random) -> list[dict]:
    rows = []
    for n in range(count):
        if n % 5 == 4:
            prompt, answer = rng.choice(NO_TOOL[0])
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                         "tools": offered(None, rng)})
            continue
        tool = list(TOOLS)[n % 4]
        prompt, arguments, result, answer = call_for(tool, False, rng)
        call = {"id": f"call_{n}", "type": "function",
                "function": {"name": tool, "arguments": json.dumps(arguments, ensure_ascii=False)}}
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "tool_calls": [call]},
                                  {"role": "tool", "tool_call_id": f"call_{n}", "content": result},
                                  {"role": "assistant", "content": answer}], "tools": offered(tool, rng)})
    return rows


def held_out_prompts(rng: random.Random, per_tool: int = 10) -> list[dict]:
    prompts = []
    for tool in TOOLS:
        for _ in range(per_tool):
            prompt, arguments, _, _ = call_for(tool, True, rng)
            prompts.append({"tool": tool, "arguments": arguments, "prompt": prompt, "tools": offered(tool, rng)})
    for prompt, _ in NO_TOOL[1]:
        prompts.append({"tool": None, "arguments": None, "prompt": prompt, "tools": offered(None, rng)})
    return prompts


def score(reply: str, case: dict) -> dict:
    from sftlab.chat_tools import fallback_call

    call = fallback_call(reply)
    names = {t["function"]["name"] for t in case["tools"]}
    if case["tool"] is None:
        return {"no_tool": True, "called": call is not None}
    well_formed = (call is not None and call["name"] in names
                   and all(k in call["arguments"] for k in TOOLS[call["name"]]["parameters"]["required"]))
    right = (well_formed and call["name"] == case["tool"]
             and all(str(call["arguments"][k]).lower() == str(v).lower() for k, v in case["arguments"].items()))
    return {"no_tool": False, "well_formed": well_formed, "right": right}


def replies_of(model, tokenizer, cases: list[dict]) -> list[str]:
    from sftlab.infer.generate import SamplingArgs, generate_replies

    conversations = [[{"role": "system", "content": "", "tools": c["tools"]}, {"role": "user", "content": c["prompt"]}]
                     for c in cases]
    return [r.text for r in generate_replies(model, tokenizer, conversations, SamplingArgs(max_new_tokens=96,
                                                                                          temperature=0))]


def summary(scores: list[dict]) -> str:
    calls = [s for s in scores if not s["no_tool"]]
    plain = [s for s in scores if s["no_tool"]]
    return (f"well-formed {sum(s['well_formed'] for s in calls)}/{len(calls)}, right "
            f"{sum(s['right'] for s in calls)}/{len(calls)}, no call where none is needed "
            f"{sum(not s['called'] for s in plain)}/{len(plain)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_rows", type=int, default=240)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--learning_rate", help="Instead of the recipe's.")
    args = parser.parse_args()
    home = os.environ.setdefault("SFTLAB_HOME", tempfile.mkdtemp(prefix="sftlab-tools-"))
    work = Path(tempfile.mkdtemp(prefix="tool-calls-", dir=home))
    rng = random.Random(0)
    train_file = work / "tool_calls.jsonl"
    rows = training_rows(args.train_rows, rng)
    train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cases = held_out_prompts(random.Random(1))
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}; {args.train_rows} training rows, "
          f"{len(cases)} held-out prompts ({sum(c['tool'] is not None for c in cases)} need a call)")
    run = work / "run"
    started = time.time()
    recipe = REPO / "configs/smollm2-135m-lora.yaml"
    rate = ["--learning_rate", args.learning_rate] if args.learning_rate else []
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", "train", "--config", str(recipe),
                           "--data_files", str(train_file), "--system_prompt", "", "--output_dir", str(run),
                           "--max_steps", str(args.steps), *rate, "--eval_strategy", "no", "--save_strategy", "no",
                           "--report_to", "none", "--retention_check", "false", "--final_eval_samples", "8"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{proc.stderr[-3000:]}")
    print(f"trained {args.steps} steps in {time.time() - started:.0f} s")
    from sftlab.model.load import load_for_inference

    results = {}
    for side, kwargs in (("base", {"model": "sftlab:smollm2-135m"}), ("tuned", {"adapter": str(run)})):
        model, tokenizer = load_for_inference(**kwargs)
        replies = replies_of(model, tokenizer, cases)
        results[side] = [score(r, c) for r, c in zip(replies, cases)]
        print(f"{side:6s} {summary(results[side])}")
        for case, reply in list(zip(cases, replies))[::10]:
            print(f"         {case['prompt']!r} -> {reply[:90]!r}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
