"""lm-evaluation-harness, unchanged, against `sftlab serve`: `local-chat-completions` on a generation task and
`local-completions` on a multiple-choice (loglikelihood) task the test writes, with and without an API key. The
multiple-choice run over the API gives the same per-choice log-likelihoods and accuracy as lm-eval's own `hf`
backend on the same model, and the generation run the same replies the server gives directly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from helpers import serving
from sftlab.infer.serve import create_app
from sftlab.model.load import load_for_inference

pytestmark = pytest.mark.slow  # each lm_eval run is a process that imports torch, datasets and evaluate

QUESTIONS = [("What is the capital of France?", "Paris"), ("2 + 2 =", "4"), ("The sky is", "blue"),
             ("你好吗？", "很好")]
CHOICES = [("The capital of France is", [" Paris", " Rome", " Berlin"], 0),
           ("Two plus two is", [" four", " five"], 0), ("Water is", [" wet", " dry", " loud"], 0)]


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n"
                                              for q, a in QUESTIONS), encoding="utf-8")
    (folder / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": label}) + "\n"
                                             for q, c, label in CHOICES), encoding="utf-8")
    (folder / "sftlab_gen.yaml").write_text(f"""task: sftlab_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""", encoding="utf-8")
    (folder / "sftlab_mc.yaml").write_text(f"""task: sftlab_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""", encoding="utf-8")
    return folder


def lm_eval(tmp: Path, task: str, model: str, model_args: str, *flags: str, key: str | None = None) -> dict:
    """Runs lm_eval's CLI; returns {"results": ..., "samples": [...]} of its output folder."""
    out = tmp / f"out-{task}-{model}-{bool(key)}"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OPENAI_API_KEY", None)
    if key:
        env["OPENAI_API_KEY"] = key
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
                           "--tasks", task, "--include_path", str(tmp / "tasks"), "--output_path", str(out),
                           "--log_samples", *flags], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
    return {"results": results["results"][task], "samples": sorted(samples, key=lambda s: s["doc_id"])}


@pytest.fixture(scope="module")
def tiny(sftlab_home):
    from sftlab.model.tiny import ensure_tiny_model

    return ensure_tiny_model("sftlab:tiny-glm4"), load_for_inference(model="sftlab:tiny-glm4", device="cpu",
                                                                      dtype="float32")


@pytest.mark.parametrize("key", [None, "s3cret"])
def test_lm_eval_local_completions_multiple_choice_matches_its_hf_backend(tiny, tmp_path, key):
    folder, (model, tokenizer) = tiny
    write_tasks(tmp_path / "tasks")
    with serving(create_app(model, tokenizer, "tiny", api_key=key, context=4096)) as url:
        served = lm_eval(tmp_path, "sftlab_mc", "local-completions",
                         f"model=tiny,base_url={url}/v1/completions,tokenizer={folder},tokenizer_backend=huggingface,"
                         # the API backend tokenizes without the tokenizer's special tokens unless told; with
                         # them GLM-4's [gMASK]<sop> leads the context, as in the hf backend
                         "add_bos_token=True,"
                         "num_concurrent=1,max_retries=1", key=key)
    local = lm_eval(tmp_path, "sftlab_mc", "hf", f"pretrained={folder},dtype=float32", "--device", "cpu")
    assert len(served["samples"]) == len(CHOICES)
    for over_api, in_process in zip(served["samples"], local["samples"]):
        api = [float(r[0][0]) for r in over_api["resps"]]
        hf = [float(r[0][0]) for r in in_process["resps"]]
        assert api == pytest.approx(hf, abs=2e-3), (api, hf)
    assert served["results"]["acc,none"] == local["results"]["acc,none"]


@pytest.mark.parametrize("key", [None, "s3cret"])
def test_lm_eval_local_chat_completions_generates_what_the_server_answers(tiny, tmp_path, key):
    _, (model, tokenizer) = tiny
    write_tasks(tmp_path / "tasks")
    with serving(create_app(model, tokenizer, "tiny", api_key=key, context=4096)) as url:
        run = lm_eval(tmp_path, "sftlab_gen", "local-chat-completions",
                      f"model=tiny,base_url={url}/v1/chat/completions,num_concurrent=1,max_retries=1",
                      "--apply_chat_template", key=key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        direct = [httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60, json={
            "messages": [{"role": "user", "content": q}], "max_tokens": 6, "temperature": 0,
            "stop": ["\n\n"]}).json()["choices"][0]["message"]["content"] for q, _ in QUESTIONS]
    assert [s["resps"][0][0] for s in run["samples"]] == direct
    assert "exact_match,none" in run["results"]
