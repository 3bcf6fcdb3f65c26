"""README.md in the Hugging Face Hub's model-card format for a run folder or a merged model: a YAML header
(base_model, library_name, pipeline_tag, tags, datasets where known; the license is left for the user: the
base model's applies), then the training config in brief, the data counts, the held-out evaluation and the
probe replies, all read from the run's own files. It replaces PEFT's empty template."""

import re
from pathlib import Path

import yaml

from sftlab.data.load import hub_parts
from sftlab.data.sources import dataset_specs
from sftlab.eval.tables import markdown_cell, table_text
from sftlab.files import write_atomic
from sftlab.run_dir import (
    DATA_REPORT,
    EVAL_DIR,
    MANIFEST,
    PREDICTIONS,
    RESOLVED_CONFIG,
    RESULTS,
    read_json,
    read_jsonl,
    read_yaml,
    stage_description,
    stage_of,
)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_datasets(data_files: list) -> list[str]:
    """The Hub ids among the run's datasets (hub:org/name[:subset[:split]] or a bare org/name that is no file)."""
    paths = [spec.path for spec in dataset_specs(data_files or [])]
    return [hub_parts(p)[0] if p.startswith("hub:") else p for p in paths
            if p.startswith("hub:") or (HUB_ID.match(p) and not Path(p).exists())]


def model_card(run_dir: Path, merged: bool = False, name: str | None = None, checkpoint: str | None = None) -> str:
    """The card's text for `run_dir` (a training run); `merged`: for the merged full model made from it, named
    `name`; `checkpoint`: made from that checkpoint of the run, not its final weights (whose evaluation and final
    probe replies are then not this model's, and are left out)."""
    config = read_yaml(run_dir / RESOLVED_CONFIG)
    model, data, train = config.get("model", {}), config.get("data", {}), config.get("train", {})
    base = str(model.get("model_name_or_path", ""))
    lora = bool(model.get("use_peft")) and not merged
    stage, manifest = stage_of(config), read_json(run_dir / MANIFEST)
    described = stage_description(manifest)  # what the run's stage says of itself
    header = {"library_name": "peft" if lora else "transformers", "pipeline_tag": "text-generation",
              "tags": ["sftlab", stage, "trl", *(["lora"] if model.get("use_peft") else []),
                       *(["merged"] if merged else [])]}
    if HUB_ID.match(base) and not Path(base).exists():
        header = {"base_model": base, **header}
    datasets = hub_datasets(data.get("data_files"))
    if datasets:
        header["datasets"] = datasets
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip(),
             "# license: set the license before publishing; the base model's license applies", "---", "",
             f"# {name or run_dir.name}{' (merged)' if merged else ''}", "",
             f"{described['title']} of `{base}` with sftlab (TRL + PEFT)"
             f"{' (' + checkpoint + ' of the run ' + run_dir.name + ')' if checkpoint else ''}"
             f"{': the LoRA adapter merged into the base weights' if merged else ''}.", ""]
    name = name or run_dir.name + ("-merged" if merged else "")
    trains_vocabulary = lora and bool(set(model.get("lora_modules_to_save") or []) & {"lm_head", "embed_tokens"})
    lines += _training(model, train, described["settings"]) + _final_weights(manifest, checkpoint)
    lines += _data(read_json(run_dir / DATA_REPORT))
    lines += _usage(name, lora, trains_vocabulary, stacked_on(run_dir) if lora else None)
    if checkpoint is None:
        lines += _evaluation(read_json(run_dir / EVAL_DIR / RESULTS))
        lines += _probes(read_jsonl(run_dir / PREDICTIONS))
    return "\n".join(lines).rstrip() + "\n"


def stacked_on(run_dir: Path) -> str | None:
    """The LoRA run an adapter was trained on top of, merged (a DPO run made by sftlab before DPO went on training
    the SFT run's adapter), or None."""
    from sftlab.run_dir import ADAPTER_CONFIG, is_adapter_folder

    config = read_json(run_dir / ADAPTER_CONFIG) or {}
    base = config.get("base_model_name_or_path")
    return base if base and Path(base).is_dir() and is_adapter_folder(base) else None


def _training(model: dict, train: dict, stage_settings: dict) -> list[str]:
    rows = {"method": (f"LoRA r={model.get('lora_r')}, alpha={model.get('lora_alpha')}, dropout "
                       f"{model.get('lora_dropout')} on {model.get('lora_target_modules')}"
                       if model.get("use_peft") else "full fine-tuning"),
            "epochs": train.get("num_train_epochs"), "max_steps": train.get("max_steps"),
            "learning_rate": train.get("learning_rate"), "schedule": train.get("lr_scheduler_type"),
            "max_length": train.get("max_length"), "tokens per micro-batch": train.get("max_tokens_per_batch"),
            "seed": train.get("seed"),
            **stage_settings}
    return ["## Training", "", *[f"- {k}: {v}" for k, v in rows.items() if v not in (None, -1)], ""]


def _final_weights(manifest: dict | None, checkpoint: str | None) -> list[str]:
    """Which checkpoint's weights the run kept as final, by the retention rule (retention_at_saves)."""
    from sftlab.eval.run_report import final_weights_line

    final = (manifest or {}).get("final_weights")
    return [final_weights_line(final), ""] if final and checkpoint is None else []


def _data(report: dict | None) -> list[str]:
    if not report:
        return []

    lines = ["## Data", "", f"{report['rows_read']} rows read, {report['kept']} kept, {report['rejected']} rejected"
             + (f" ({', '.join(f'{k} {v}' for k, v in report['reasons'].items())})" if report.get("reasons") else "")
             + ".", ""]
    for name, d in (report.get("datasets") or {}).items():
        lines.append(f"- {name}: {d['kept']} kept, weight {d['weight']:g}, {d.get('train_rows', '-')} training rows")
    lines += [""] if report.get("datasets") else []
    if report.get("replay"):
        from sftlab.data.report import replay_line

        lines += [replay_line(report) + ".", ""]
    return lines


def _usage(name: str, lora: bool, trains_vocabulary: bool = False, stacked: str | None = None) -> list[str]:
    if stacked:
        return ["## Use", "", f"This adapter was trained on `{stacked}` (an SFT LoRA run) merged into its base, so "
                "PEFT alone cannot load it. With sftlab: `sftlab chat --adapter " + name + "` (or eval, serve); for "
                "a standalone model: `sftlab merge --adapter " + name + "` (both adapters merged), which "
                "transformers, vLLM and `sftlab export` load.", "",
                "Generation stops on every id in `generation_config.json`'s `eos_token_id`.", ""]
    load = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained"
            f"(\"{name}\")" if lora else
            f"from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"{name}\")")
    return ["## Use", "", "```python", load, "from transformers import AutoTokenizer",
            f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")  # the chat template it was trained with", "```",
            "", "Generation stops on every id in `generation_config.json`'s `eos_token_id`.", ""] + ([
            "This adapter trains the output layer in full (`modules_to_save`). lm-evaluation-harness's `hf` backend "
            "with `peft=` first resizes the base's embeddings to the tokenizer's length, which no longer fits it "
            "where the vocabulary is padded (GLM-4's is): merge first (`sftlab merge`) and pass the merged folder "
            "as `pretrained=`, or evaluate with `sftlab eval --tasks`.", ""] if trains_vocabulary else [])


def _evaluation(results: dict | None) -> list[str]:
    if not results:
        return []
    return ["## Evaluation (held-out split)", "", "```", table_text(results), "```", ""]


def _probes(predictions: list[dict] | None) -> list[str]:
    final = [p for p in predictions or [] if p.get("final")]
    if not final:
        return []
    lines = ["## Probe replies (greedy, after training)", "", "| prompt | reply | end |", "| --- | --- | --- |"]
    for p in final:
        lines.append(f"| {markdown_cell(p['prompt'], 200)} | {markdown_cell(p['reply'], 200)} | {p['finish_reason']} |")
    return lines + [""]


def write_model_card(run_dir: Path, target: Path | None = None, merged: bool = False, name: str | None = None,
                     checkpoint: str | None = None) -> Path:
    target = Path(target or run_dir)
    write_atomic(target / "README.md", model_card(Path(run_dir), merged, name, checkpoint))
    return target / "README.md"
