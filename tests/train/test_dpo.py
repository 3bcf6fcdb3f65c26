"""`sftlab dpo`: sftlab's DPO loss equals TRL's on one batch (the lifecycle every stage shares, kill and resume
among it, is tests/train/test_stages.py's); a resume that changes beta, or the stage, is refused; the demo recipe (SFT
then DPO on the tiny model) lifts held-out preference accuracy from chance to at least 0.8 with every reply still
stopping, and writes exactly the files of a run."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from helpers import killed_before_final_save
from sftlab.chat_format import ChatRenderer
from sftlab.config import parse_verb
from sftlab.data.load import demo_data_path, iter_source
from sftlab.data.preference import prepare_pairs
from sftlab.errors import UserError
from sftlab.eval.preference import collate_pairs, dpo_sigmoid_loss, sequence_logps
from sftlab.train.dpo import ARGUMENTS, DpoConfig, SftlabDpoTrainer, dpo

REPO = Path(__file__).resolve().parents[2]


def dpo_args(out: Path, *extra: str):
    return parse_verb("sftlab dpo", ARGUMENTS, [
        "--config", str(REPO / "configs/demo-dpo.yaml"), "--model_name_or_path", "sftlab:tiny-glm4",
        "--output_dir", str(out), "--report_to", "none", "--max_steps", "6", "--save_steps", "3",
        "--eval_strategy", "no", "--logging_steps", "1", "--probe_prompts", "hi", "--probe_max_new_tokens", "2",
        "--final_eval_samples", "0", "--save_total_limit", "1", "--max_tokens_per_batch", "256", *extra])


def test_sftlabs_dpo_loss_equals_trls_on_one_batch(tmp_path, tiny_model_dir, tokenizer):
    """The log-probabilities the held-out judgement uses (eval/preference.py) are the ones TRL's DPO loss is taken
    on: the loss from them equals DPOTrainer's own on a batch, with a LoRA adapter moved off zero so that the
    policy and its reference (the adapter disabled) differ."""
    from datasets import Dataset
    from peft import LoraConfig

    from sftlab.model.load import load_model

    pairs = prepare_pairs(iter_source(str(demo_data_path("sftlab:preference-demo"))), ChatRenderer(tokenizer),
                          None, 0.0, 42).train[:6]
    config = DpoConfig(output_dir=str(tmp_path), report_to="none", beta=0.3, max_tokens_per_batch=None,
                       bf16=False, activation_checkpointing=False, eval_strategy="no")
    trainer = SftlabDpoTrainer(model=load_model(tiny_model_dir, "float32"), args=config, processing_class=tokenizer,
                               train_dataset=Dataset.from_list(pairs),
                               peft_config=LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
        policy, _ = sequence_logps(trainer.model, batch)
        with trainer.model.disable_adapter():
            reference, _ = sequence_logps(trainer.model, batch)
    ours = dpo_sigmoid_loss(policy, reference, beta=0.3)
    assert abs(float(ours) - float(torch.log(torch.tensor(2.0)))) > 1e-3  # the adapter moved the policy
    assert float(trl_loss) == pytest.approx(float(ours), abs=1e-5)
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    margins = 0.3 * ((chosen - ref_chosen) - (rejected - ref_rejected))
    assert trainer._metrics["eval"]["rewards/margins"][-1] == pytest.approx(float(margins.mean()), abs=1e-5)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return dpo(*dpo_args(tmp_path_factory.mktemp("dpo") / "straight"))


@pytest.fixture
def unfinished(straight, tmp_path):
    return killed_before_final_save(straight, tmp_path / "run")


@pytest.mark.slow
def test_a_resume_that_changes_beta_or_the_stage_is_refused(unfinished):
    with pytest.raises(UserError) as error:
        dpo(*dpo_args(unfinished, "--resume", "--beta", "0.2"))
    assert "--resume with a changed recipe: beta: 0.5 -> 0.2." in str(error.value)
    with pytest.raises(UserError) as error:
        dpo(*dpo_args(unfinished, "--resume", "--loss_type", "ipo"))
    assert "loss_type: ['sigmoid'] -> ['ipo']" in str(error.value)
    from sftlab.train.config import parse_args
    from sftlab.train.sft import train

    with pytest.raises(UserError) as error:
        train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(unfinished),
                           "--report_to", "none", "--resume"]))
    assert "this run is a DPO run; this command is for an SFT run (resume it with `sftlab dpo`)" in str(error.value)
    assert not (unfinished / "amendments.jsonl").exists()


@pytest.mark.slow
def test_dpo_resume_on_an_sft_run_is_refused_naming_the_stage(trained_run, tmp_path):
    from helpers import TRAINED

    for sft_run in (killed_before_final_save(trained_run(*TRAINED), tmp_path / "sft"), trained_run(*TRAINED)):
        with pytest.raises(UserError) as error:  # unfinished, and finished: not "nothing to resume"
            dpo(*dpo_args(sft_run, "--resume"))
        assert "this run is an SFT run; this command is for a DPO run (resume it with `sftlab train`)" in \
            str(error.value)


@pytest.fixture(scope="module")
def after_sft(trained_run, tmp_path_factory):
    """DPO from the SFT demo's LoRA run (LoRA r 32 with lm_head trained in full), and that SFT run."""
    from helpers import TRAINED

    sft = trained_run(*TRAINED)
    out = dpo(*dpo_args(tmp_path_factory.mktemp("dpo") / "after-sft", "--model_name_or_path", str(sft),
                        "--final_eval_samples", "3"))
    return sft, out


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
def test_dpo_from_an_sft_lora_run_is_one_adapter_over_the_original_base_that_peft_loads_in_one_step(after_sft):
    import yaml
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    from sftlab.model.load import load_for_inference

    sft, out = after_sft
    sft_adapter, adapter = (json.loads((run / "adapter_config.json").read_text()) for run in (sft, out))
    for key in ("base_model_name_or_path", "r", "lora_alpha", "target_modules", "modules_to_save"):
        assert adapter[key] == sft_adapter[key], key  # the SFT adapter, gone on training, over the original base
    saved_ref = [p for p in out.rglob("*") if p.name == "ref"]
    assert not saved_ref, saved_ref  # TRL's frozen reference copy is never saved
    assert yaml.safe_load((out / "sftlab_config.yaml").read_text())["model"]["lora_r"] == sft_adapter["r"] == 32
    assert json.loads((out / "manifest.json").read_text())["reference"] == \
        "the SFT run's adapter as it started (a frozen copy)"
    trained, started = load_file(out / "adapter_model.safetensors"), load_file(sft / "adapter_model.safetensors")
    assert trained.keys() == started.keys() and any(not torch.equal(trained[k], started[k]) for k in trained)
    results = json.loads((out / "eval/results.json").read_text())  # judged against the SFT model as it started
    assert results["base"]["preference_accuracy"] == 0.5 and results["base"]["mean_margin"] == 0.0
    assert results["tuned"]["mean_margin"] != 0.0
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()  # PEFT alone, one step
    ours = load_for_inference(adapter=str(out), device="cpu", dtype="float32")[0]
    with torch.no_grad():
        difference = (plain(ids).logits - ours(ids).logits).abs().max().item()
    assert difference < 1e-4, difference


@pytest.mark.slow
def test_simpo_over_an_sft_adapter_is_judged_against_that_adapter_as_it_started(after_sft, tmp_path):
    """CPO keeps no reference copy: the start is loaded beside the trained adapter for the judgement, never saved."""
    from sftlab.eval.evaluate import run_eval

    sft, _ = after_sft
    out = dpo(*dpo_args(tmp_path / "simpo", "--model_name_or_path", str(sft), "--loss_type", "simpo", "--beta", "2.0",
                        "--final_eval_samples", "1000"))
    results = json.loads((out / "eval/results.json").read_text())
    assert results["base"]["mean_margin"] == 0.0 and results["tuned"]["mean_margin"] != 0.0
    # `sftlab eval --compare_base` loads the SFT run as a separate model: the same margins, so the run's reference
    # was that run as it started (not the base under it)
    again = json.loads((run_eval(None, str(out), None, True, 8, 16, str(tmp_path / "e")) / "results.json").read_text())
    assert again["tuned"]["mean_margin"] == pytest.approx(results["tuned"]["mean_margin"], abs=1e-3)
    assert not [p for p in out.rglob("*") if p.name == "ref"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == json.loads((sft / "adapter_config.json").read_text())[
        "base_model_name_or_path"]


@pytest.mark.slow
def test_a_dpo_run_over_an_sft_adapter_completed_by_resume_is_judged_against_that_adapter(after_sft, tmp_path):
    """The completion loads the SFT adapter as it was beside the run's (no trainer, no TRL copy), so it judges as
    the run itself did."""
    sft, out = after_sft
    run = tmp_path / "run"
    import shutil

    shutil.copytree(out, run)
    for name in ("eval", "README.md", "report.md"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "completed": False}))
    dpo(*dpo_args(run, "--model_name_or_path", str(sft), "--final_eval_samples", "3", "--resume"))
    judged = [json.loads((folder / "eval/results.json").read_text()) for folder in (out, run)]
    for key in ("preference_accuracy", "mean_margin"):
        assert judged[1]["tuned"][key] == pytest.approx(judged[0]["tuned"][key], abs=1e-3)
        assert judged[1]["base"][key] == judged[0]["base"][key]


@pytest.mark.slow
@pytest.mark.parametrize("precompute", ["false", "true"])
def test_full_fine_tuning_dpo_judges_against_its_start(tmp_path, precompute):
    """No adapter to disable: the reference is a frozen copy (or, precomputed, the policy before training), and
    the judgement after training loads the start again."""
    out = dpo(*dpo_args(tmp_path / "full", "--use_peft", "false", "--learning_rate", "1e-4", "--max_steps", "2",
                        "--final_eval_samples", "4", "--precompute_ref_log_probs", precompute))
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    results = json.loads((out / "eval/results.json").read_text())
    assert results["base"]["preference_accuracy"] == 0.5 and results["tuned"]["preference_accuracy"] != 0.5
    assert "retention" not in results  # full fine-tuning: sftlab eval --compare_base
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reference"] == ("a frozen copy" if precompute == "false" else "precomputed")


def test_simpo_and_orpo_take_the_pair_as_rendered_with_the_prompt_masked():
    from sftlab.train.dpo import RenderedRows

    row = RenderedRows().tokenize_row({"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]})
    assert row == {"prompt_input_ids": [5, 6], "prompt_attention_mask": [1, 1],
                   "chosen_input_ids": [5, 6, 7, 2], "chosen_attention_mask": [1, 1, 1, 1],
                   "chosen_labels": [-100, -100, 7, 2], "rejected_input_ids": [5, 6, 8, 9, 2],
                   "rejected_attention_mask": [1, 1, 1, 1, 1], "rejected_labels": [-100, -100, 8, 9, 2]}


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_train_through_their_trl_trainers_and_are_judged(tmp_path, loss):
    out = dpo(*dpo_args(tmp_path / loss, "--loss_type", loss, "--beta", "2.0" if loss == "simpo" else "0.1",
                        "--max_steps", "3", "--final_eval_samples", "4"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reference"] == f"none ({loss})" and manifest["completed"] is True
    results = json.loads((out / "eval/results.json").read_text())
    assert results["base"]["preference_accuracy"] == 0.5 and results["tuned"]["n"] == 4
    records = [r for r in log_records(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and all("rewards/margins" in r for r in records)
    if loss == "orpo":
        assert all("log_odds_ratio" in r for r in records)
    assert f"Preference tuning ({'SimPO' if loss == 'simpo' else 'ORPO'}) of" in (out / "README.md").read_text()


def test_a_preference_pair_is_never_truncated(tmp_path):
    with pytest.raises(UserError, match="a preference pair over max_length is rejected"):
        dpo(*dpo_args(tmp_path / "run", "--overflow", "truncate"))


def test_an_unknown_loss_type_names_the_ones_that_fit():
    with pytest.raises(ValueError, match="loss_type: kto is not one of sigmoid, ipo, hinge"):
        DpoConfig(output_dir="x", report_to="none", loss_type=["kto"])
    with pytest.raises(ValueError, match="loss_type: simpo and orpo train alone"):
        DpoConfig(output_dir="x", report_to="none", loss_type=["sigmoid", "simpo"])


RUN_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "data_report.json", "eval",
             "generation_config.json", "heldout.jsonl", "loss_curves.png", "manifest.json", "predictions.jsonl",
             "preference_curves.png", "rejected.jsonl", "render_check.json", "report.md", "sftlab_config.yaml",
             "tokenizer.json", "tokenizer_config.json", "trainer_log.jsonl", "trainer_state.json"}


@pytest.mark.slow
def test_the_demo_recipe_lifts_preference_accuracy_from_chance_and_replies_still_stop(tmp_path):
    """make demo-dpo: the SFT demo, then DPO from its run (its adapter trained on, the reference that adapter as
    it started)."""
    from sftlab.train.config import parse_args
    from sftlab.train.sft import train

    sft_run = train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir",
                                 str(tmp_path / "sft"), "--report_to", "none"]))
    out = dpo(*parse_verb("sftlab dpo", ARGUMENTS, [
        "--config", str(REPO / "configs/demo-dpo.yaml"), "--model_name_or_path", str(sft_run),
        "--output_dir", str(tmp_path / "dpo"), "--report_to", "none"]))
    results = json.loads((out / "eval/results.json").read_text())
    assert results["base"]["preference_accuracy"] == 0.5 and results["base"]["mean_margin"] == 0.0
    assert results["tuned"]["preference_accuracy"] >= 0.8 and results["tuned"]["mean_margin"] > 0
    assert results["base"]["stop_rate"] == results["tuned"]["stop_rate"] == 1.0
    assert results["base"]["n"] == 23
    assert {p.name for p in out.iterdir() if not p.name.startswith("checkpoint-")} == RUN_FILES
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == json.loads((sft_run / "adapter_config.json").read_text())[
        "base_model_name_or_path"]  # the SFT adapter, trained on: one adapter over the original base
    assert json.loads((out / "manifest.json").read_text())["completed"] is True
    assert "Preference tuning (DPO) of" in (out / "README.md").read_text()
    assert (out / "sftlab_config.yaml").read_text().startswith("stage: dpo\n")


@pytest.mark.slow
def test_two_process_dpo_logs_what_one_process_accumulating_two_micro_batches_logs(tmp_path):
    """accelerate, 2 CPU processes (gloo): TRL's DPO gathers per-pair metrics across processes, so each takes
    per_device_train_batch_size pairs per micro-batch (said in one line); the losses equal one process's with
    gradient_accumulation_steps 2, and the run folder is written once."""
    import os
    import subprocess
    import sys

    def launch(out: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
        accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_machines", "1",
                      "--multi_gpu" if processes > 1 else "--cpu", "--num_processes", str(processes),
                      "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sftlab.cli"]
        args = ["dpo", "--config", str(REPO / "configs/demo-dpo.yaml"), "--model_name_or_path", "sftlab:tiny-glm4",
                "--output_dir", str(out), "--report_to", "none", "--max_steps", "4", "--save_steps", "2",
                "--eval_strategy", "no", "--logging_steps", "1", "--final_eval_samples", "2",
                "--final_eval_max_new_tokens", "4", "--probe_max_new_tokens", "4", "--use_cpu", "true",
                "--per_device_train_batch_size", "4", *extra]
        return subprocess.run(accelerate + args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    two = launch(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "4 pairs per micro-batch on each of the 2 processes, not max_tokens_per_batch" in two.stdout
    one = launch(tmp_path / "one", 1, "--gradient_accumulation_steps", "2", "--max_tokens_per_batch", "null")
    assert one.returncode == 0, one.stderr[-4000:]
    logged = {name: [r for r in log_records(tmp_path / name) if "loss" in r] for name in ("two", "one")}
    assert [r["step"] for r in logged["two"]] == [1, 2, 3, 4]  # written once, by the main process
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert [r[key] for r in logged["two"]] == pytest.approx([r[key] for r in logged["one"]], abs=1e-5), key
    assert json.loads((tmp_path / "two/manifest.json").read_text())["completed"] is True


@pytest.mark.slow
def test_a_dpo_run_is_a_run_like_any_other_for_every_verb_that_reads_runs(straight, tmp_path, capsys, monkeypatch):
    """export, doctor (--gguf too), eval, chat and serve on a DPO run, whose held-out rows are pairs: the verbs that
    want held-out prompts take each pair's prompt (a KeyError: 'messages' once)."""
    import uvicorn

    import sftlab.infer.serve as serve
    from sftlab import cli

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # serve returns where it would listen
    monkeypatch.setattr(serve, "check_listen", lambda *a: None)  # on any port
    run = str(straight)

    def ok(*argv, codes=(0,)):
        code = cli.main(list(argv))
        out = capsys.readouterr()
        assert code in codes and "Traceback" not in out.err and "error:" not in out.err, (argv, out.err[-1500:])
        return out.out

    exported = tmp_path / "gguf"
    ok("export", "--adapter", run, "--output", str(exported), "--max_new_tokens", "4")
    gguf = next(exported.glob("*.gguf"))
    # six steps of DPO on the untrained tiny base: its checks may FAIL (exit 1: it does not stop), but each runs
    report = ok("doctor", "--adapter", run, "--gguf", str(gguf), codes=(0, 1))
    assert "the GGUF answers as the model does: " in report and "prompts matched" in report
    assert "tuned" in ok("eval", "--adapter", run, "--output", str(tmp_path / "eval"), "--max_new_tokens", "4")
    ok("chat", "--adapter", run, "--prompt", "hi", "--max_new_tokens", "2")
    assert "serving straight" in ok("serve", "--adapter", run)
