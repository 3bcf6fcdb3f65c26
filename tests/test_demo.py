"""The demo's promise, on the real demo config: the tuned tiny GLM-4 says it is 灵犀/Lingxi and stops; the
base model does neither."""

from pathlib import Path

from sftlab.infer.generate import SamplingArgs, generate_replies
from sftlab.model.load import load_for_inference
from sftlab.train.sft import parse_args, train

REPO = Path(__file__).resolve().parents[1]
IDENTITY = ["你是谁？", "你叫什么名字？", "Who are you?"]
PROBES = ["你好，告诉我你的名字。", "告诉我1+2等于多少？"]


def ask(model, tokenizer, prompts):
    greedy = SamplingArgs(max_new_tokens=48, temperature=0)  # the chat CLI's defaults, greedy
    return generate_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], greedy)


def test_demo_teaches_identity_and_stopping(tmp_path):
    out = train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(tmp_path / "demo"),
                             "--report_to", "none"]))
    tuned, tokenizer = load_for_inference(adapter=str(out))
    replies = ask(tuned, tokenizer, IDENTITY + PROBES)
    named = [r for r in replies[:3] if ("灵犀" in r.text or "Lingxi" in r.text) and r.finish_reason == "stop"]
    assert len(named) >= 2, replies
    assert all(r.finish_reason == "stop" for r in replies[3:]), replies
    base, tokenizer = load_for_inference(model="sftlab:tiny-glm4")
    base_replies = ask(base, tokenizer, IDENTITY + PROBES)
    assert not any("灵犀" in r.text or "Lingxi" in r.text for r in base_replies)
    assert all(r.finish_reason == "length" for r in base_replies)
