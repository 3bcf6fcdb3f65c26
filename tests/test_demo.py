"""The demo's promise, on the real demo config: the tuned tiny GLM-4 says it is 灵犀/Lingxi and stops; the
base model does neither."""


import pytest

from helpers import REPO
from sftlab.infer.generate import SamplingArgs, generate_replies
from sftlab.model.load import load_for_inference
from sftlab.train.config import parse_args
from sftlab.train.sft import train

pytestmark = pytest.mark.slow  # the full demo training run
IDENTITY = ["你是谁？", "你叫什么名字？", "Who are you?"]
PROBES = ["你好，告诉我你的名字。", "告诉我1+2等于多少？"]


def ask(model, tokenizer, prompts):
    greedy = SamplingArgs(max_new_tokens=48, temperature=0)  # the chat CLI's defaults, greedy
    return generate_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], greedy)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(out),
                              "--report_to", "none"]))


def test_demo_teaches_identity_and_stopping(demo_run):
    out = demo_run
    tuned, tokenizer = load_for_inference(adapter=str(out))
    replies = ask(tuned, tokenizer, IDENTITY + PROBES)
    named = [r for r in replies[:3] if ("灵犀" in r.text or "Lingxi" in r.text) and r.finish_reason == "stop"]
    assert len(named) >= 2, replies
    assert all(r.finish_reason == "stop" for r in replies[3:]), replies
    base, tokenizer = load_for_inference(model="sftlab:tiny-glm4")
    base_replies = ask(base, tokenizer, IDENTITY + PROBES)
    assert not any("灵犀" in r.text or "Lingxi" in r.text for r in base_replies)
    assert all(r.finish_reason == "length" for r in base_replies)


def test_demo_run_report_and_before_after_evaluation(demo_run):
    import json

    from sftlab.eval.evaluate import run_eval

    out = demo_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"config", "data_fingerprint", "libraries", "git_commit", "seed", "hardware", "peak_memory_mb"} <= set(manifest)
    assert manifest["seed"] == 42 and manifest["libraries"]["trl"]
    report = (out / "report.md").read_text()
    for part in ("![loss curves](loss_curves.png)", "## Data", "tokens_per_second", "## Evaluation (held-out split)",
                 "## Probe replies over training"):
        assert part in report
    assert (out / "loss_curves.png").stat().st_size > 0

    eval_dir = run_eval(None, str(out), None, compare_base=True, max_new_tokens=48, batch_size=16)
    results = json.loads((eval_dir / "results.json").read_text())
    keys = {"eval_loss", "perplexity", "rouge_1", "rouge_2", "rouge_l", "bleu_4", "stop_rate", "mean_new_tokens", "n"}
    assert set(results) == {"base", "tuned", "retention"} and keys <= set(results["base"]) and keys <= set(results["tuned"])
    assert results["retention"]["verdict"] == "n/a"  # a randomly initialised base knows nothing to keep
    assert results["tuned"]["rouge_l"] > results["base"]["rouge_l"]
    assert results["tuned"]["stop_rate"] > results["base"]["stop_rate"] and results["tuned"]["stop_rate"] >= 0.9
    assert results["tuned"]["eval_loss"] < results["base"]["eval_loss"]
    samples = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == results["tuned"]["n"] and {"prompt", "reference", "base", "tuned"} <= set(samples[0])
    assert "| rouge_l |" in (eval_dir / "report.md").read_text()
