"""The demo on every other embedded family: trained with configs/demo.yaml, each tuned model says it is
灵犀/Lingxi and stops on the identity questions, the doctor passes on its run, and its GGUF export (f16) answers
every round-trip prompt with transformers' greedy tokens and stop in llama.cpp, which tokenizes text as the
model's tokenizer does (the tiny GLM-4 is tests/test_demo.py and tests/export/test_gguf.py)."""


import json

import llama_cpp
import pytest

from helpers import REPO
from sftlab.eval.doctor import run_checks
from sftlab.export.gguf import ExportArguments, export
from sftlab.infer.generate import SamplingArgs, generate_replies
from sftlab.model.load import load_for_inference
from sftlab.train.config import parse_args
from sftlab.train.sft import train

pytestmark = pytest.mark.slow  # three demo training runs
IDENTITY = ["你是谁？", "你叫什么名字？", "Who are you?"]
PROBES = ["你好，告诉我你的名字。", "告诉我1+2等于多少？"]


def ask(model, tokenizer, prompts):
    greedy = SamplingArgs(max_new_tokens=48, temperature=0)
    return generate_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], greedy)


@pytest.mark.parametrize("model", ["sftlab:tiny-glm4-0414", "sftlab:tiny-qwen3", "sftlab:tiny-llama3"])
def test_demo_teaches_identity_and_stopping_on_each_family(model, tmp_path):
    out = train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--model_name_or_path", model,
                             "--output_dir", str(tmp_path / "run"), "--report_to", "none",
                             "--eval_strategy", "no", "--final_eval_samples", "0", "--save_steps", "0.5"]))
    tuned, tokenizer = load_for_inference(adapter=str(out))
    replies = ask(tuned, tokenizer, IDENTITY + PROBES)
    named = [r for r in replies[:3] if ("灵犀" in r.text or "Lingxi" in r.text) and r.finish_reason == "stop"]
    assert len(named) == 3, replies
    assert all(r.finish_reason == "stop" and "<think>" not in r.text for r in replies), replies
    exported = export(ExportArguments(adapter=str(out), output=str(tmp_path / "gguf")))
    checks = run_checks(None, str(out), max_new_tokens=48, gguf=str(exported / "model-f16.gguf"))
    assert [c.name for c in checks if c.status == "FAIL"] == [], checks
    trip = json.loads((exported / "export.json").read_text())["round_trip"]
    assert trip["matched"] == trip["total"] == 7, trip["answers"]
    llm = llama_cpp.Llama(model_path=str(exported / "model-f16.gguf"), vocab_only=True, verbose=False)
    for text in ["Hello world, it's 2026!", "我想在apple工作1314151天～", "  spaces\n\n\ttabs 3.14159"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(
            text, add_special_tokens=False), text
    llm.close()
