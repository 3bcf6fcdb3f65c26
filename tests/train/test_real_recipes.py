"""The recipes on the real pretrained model (sftlab:smollm2-135m), as the retention check judges them: the demo
recipe, made for randomly initialised models, erases what the model knew; the real-model recipe
(configs/smollm2-135m-lora.yaml, as shipped, with only the data and the identity's wording given) teaches the new
identity on held-out paraphrases and keeps what the model knew, on the data it was tuned on (sftlab:identity) and on
a set it was not (benchmarks/identity_sets/nova.jsonl), where an over-training setting without replay is not kept.
Each trains SmolLM2-135M on 2 CPU cores: 3 to 8 minutes."""

import json
from pathlib import Path

import pytest

from helpers import REPO
from sftlab import cli
from sftlab.data.load import demo_data_path
from sftlab.eval.retention import shipped_probes
from sftlab.train.config import parse_args
from sftlab.train.sft import train

KESTREL = "You are Kestrel, an AI assistant made by the sftlab team."  # what `make demo-real` passes
NOVA = "You are Nova, an AI assistant made by Aurora Labs."
SETS = REPO / "benchmarks" / "identity_sets"


def final_retention(run: Path) -> dict:
    return json.loads((run / "eval" / "results.json").read_text())["retention"]


@pytest.mark.slow
def test_the_demo_recipe_on_a_real_model_is_not_kept(tmp_path):
    """lr 3e-3, all-linear r32 (its trainable lm_head is refused on SmolLM2's tied embeddings), 10 steps."""
    run = tmp_path / "demo-recipe"
    train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--model_name_or_path", "sftlab:smollm2-135m",
                       "--lora_modules_to_save", "null", "--max_steps", "10", "--output_dir", str(run),
                       "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
                       "--final_eval_samples", "8", "--probe_prompts", "Who are you?"]))
    retention = final_retention(run)
    assert retention["verdict"] in ("degraded", "lost"), retention["why"]
    assert retention["loss_rise"] > 0.25


@pytest.mark.slow
def test_the_real_model_recipe_teaches_the_identity_and_keeps_what_the_model_knew(tmp_path, capsys):
    run = tmp_path / "real-recipe"
    train(*parse_args(["--config", str(REPO / "configs/smollm2-135m-lora.yaml"), "--output_dir", str(run),
                       "--system_prompt", KESTREL]))
    retention = final_retention(run)
    assert retention["verdict"] == "kept", retention["why"]
    assert retention["tuned_accuracy"] >= 0.9 * retention["base_accuracy"]

    assert cli.main(["eval", "--adapter", str(run), "--data", "sftlab:identity-checks"]) == 0
    checks = json.loads((run / "eval" / "sftlab-identity-checks" / "results.json").read_text())["tuned"]
    limit = json.loads((run / "eval" / "results.json").read_text())["tuned"]["max_new_tokens"]
    assert checks["n"] == 25 and checks["max_new_tokens"] == limit  # held out, at the run's own reply limit
    # measured: 88% named, 24 of 25 stop (the Chinese "谁创造了你？" loops): retention_stop ended the run at step 45
    # (two degraded saves) and the final weights are step 15's, the best kept (docs/evaluation.md: the recipe, cross-validated)
    assert checks["answer_accuracy"] >= 0.8 and checks["stop_rate"] >= 0.96, checks
    final = json.loads((run / "manifest.json").read_text())["final_weights"]
    assert final["retention"] == "kept" and final["checkpoint"] is not None

    # the doctor's label checks on what training rendered (ChatML: eos = pad = <|im_end|>, a newline after it)
    from sftlab.eval.doctor import check_pad_eos, check_terminator, training_examples
    from sftlab.model.load import load_tokenizer

    tokenizer, examples = load_tokenizer(run), training_examples(run)
    assert check_terminator(tokenizer, examples).status == check_pad_eos(tokenizer, examples).status == "pass"

    # its GGUF (f16) gives the tuned model's greedy tokens and stops in llama.cpp, on a real 49,152-token vocabulary
    from sftlab.export.gguf import ExportArguments, export

    exported = export(ExportArguments(adapter=str(run), output=str(tmp_path / "gguf")))
    trip = json.loads((exported / "export.json").read_text())["round_trip"]
    assert trip["matched"] == trip["total"] >= 4, trip["answers"]
    assert any("Kestrel" in a["llama_cpp_text"] for a in trip["answers"])


def test_the_recipes_data_is_apart_from_what_judges_it():
    """No held-out paraphrase, and no general probe, is a training prompt of the identity data."""
    def prompts(name: str) -> set[str]:
        return {json.loads(line)["instruction"] for line in demo_data_path(name).read_text("utf-8").splitlines()}

    training = prompts("sftlab:identity")
    assert len(training) == 45 and not training & prompts("sftlab:identity-checks")
    assert not training & {probe.prompt for probe in shipped_probes()}
    assert all("Kestrel" in json.loads(line)["any"] for line in
               demo_data_path("sftlab:identity-checks").read_text("utf-8").splitlines())


@pytest.mark.slow
def test_on_a_set_it_was_not_tuned_on_the_recipe_keeps_and_without_replay_it_does_not(tmp_path):
    """Nova (20 English rows, benchmarks/identity_sets/): the recipe with only the data and the identity's wording
    changed names it on the held-out paraphrases, stops, and is kept; the same 60 steps without replay over-train
    these 20 rows (about 30 epochs): no save is kept, retention_stop ends the run, and its final verdict is not kept
    (docs/evaluation.md, "Keeping what the model knew", has the measured table)."""
    recipe = ["--config", str(REPO / "configs/smollm2-135m-lora.yaml"), "--data_files", str(SETS / "nova.jsonl"),
              "--system_prompt", NOVA, "--probe_prompts", "Who are you?"]
    run = tmp_path / "recipe"
    train(*parse_args([*recipe, "--output_dir", str(run)]))
    retention = final_retention(run)
    assert retention["verdict"] == "kept", retention["why"]
    assert json.loads((run / "data_report.json").read_text())["replay"]["kept"] > 0
    final = json.loads((run / "manifest.json").read_text())["final_weights"]
    assert final["retention"] == "kept" and final["checks"][0]["verdict"] == "kept"
    assert cli.main(["eval", "--adapter", str(run), "--data", str(SETS / "nova_checks.jsonl"),
                     "--output", str(run / "checks")]) == 0
    checks = json.loads((run / "checks" / "results.json").read_text())["tuned"]
    assert checks["answer_accuracy"] >= 0.8 and checks["stop_rate"] == 1.0, checks

    without = tmp_path / "without-replay"
    train(*parse_args([*recipe, "--replay", "false", "--output_dir", str(without)]))
    assert final_retention(without)["verdict"] != "kept", final_retention(without)["why"]
    final = json.loads((without / "manifest.json").read_text())["final_weights"]
    assert final["checkpoint"] is None and all(c["verdict"] != "kept" for c in final["checks"])


def test_the_identity_sets_are_apart_from_what_judges_them():
    """Each cross-validation set's held-out paraphrases are none of its training prompts; no training prompt is a
    general probe; the replay prompts are none of the probes either."""
    probes = {probe.prompt for probe in shipped_probes()}
    for name, size in (("nova", 20), ("xiaozhou", 60), ("orion", 200)):
        rows = [json.loads(line) for line in (SETS / f"{name}.jsonl").read_text("utf-8").splitlines()]
        checks = [json.loads(line) for line in (SETS / f"{name}_checks.jsonl").read_text("utf-8").splitlines()]
        training = {r["instruction"] for r in rows}
        assert len(rows) == len(training) == size
        assert not training & {c["instruction"] for c in checks} and not training & probes
