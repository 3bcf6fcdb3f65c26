"""The run report (report.md + loss_curves.png) and the manifest of a training run directory."""

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from sftlab.eval.tables import markdown_cell, table_text
from sftlab.files import write_atomic
from sftlab.run_dir import (
    DATA_REPORT,
    EVAL_DIR,
    LOSS_PLOT,
    MANIFEST,
    PREDICTIONS,
    PREFERENCE_PLOT,
    REPORT,
    RESULTS,
    TRAINER_LOG,
    TRAINER_STATE,
    read_json,
    read_jsonl,
    stage_description,
    write_json,
)

LIBRARIES = ("sftlab", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "swanlab", "tokenizers")


CURVES = (("", "-", "#4C72B0", "train"), ("eval_", "o-", "#C44E52", "held-out"))  # (key prefix, style, color, name)


def plot_over_steps(logs: list[dict], path: Path, panels: list[tuple[str, str]], width: float) -> bool:
    """One panel per (logged key, axis label): the value on training batches and on the held-out split (the
    trainer logs it as eval_KEY) over steps; a key never logged has no panel (KTO logs no accuracy). False, and no
    file, when nothing of it was logged."""
    panels = [(key, label) for key, label in panels if any(prefix + key in r for r in logs for prefix, *_ in CURVES)]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for prefix, style, color, name in CURVES:
            points = [(r["step"], r[prefix + key]) for r in logs if prefix + key in r]
            if points:
                ax.plot(*zip(*points), style, label=name, color=color)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


RETENTION_PANELS = [("retention/retained", "retention: share of the base's right\nprobe answers kept"),
                    ("retention/loss_rise", "retention: loss rise on the\nbase's own replies (nats/token)")]


def plot_losses(logs: list[dict], path: Path, label: str = "loss (supervised tokens)") -> bool:
    """The loss over steps, with the retention checked at each save beside it (retention_at_saves)."""
    retention = [panel for panel in RETENTION_PANELS if any(panel[0] in r for r in logs)]
    return plot_over_steps(logs, path, [("loss", label), *retention], 7 + 4 * len(retention))


def plot_preferences(logs: list[dict], path: Path) -> bool:
    """A DPO run's implicit-reward margin and preference accuracy over steps (TRL's rewards/margins and
    rewards/accuracies)."""
    return plot_over_steps(logs, path, [("rewards/margins", "reward margin (chosen - rejected)"),
                                        ("rewards/accuracies", "preference accuracy")], 11)


def throughput(state: dict, logs: list[dict]) -> dict:
    summary = next((r for r in reversed(logs) if "train_runtime" in r), {})
    tokens = max((r.get("num_tokens", 0) for r in logs), default=0)
    seconds = summary.get("train_runtime")
    out = {"train_seconds": seconds, "samples_per_second": summary.get("train_samples_per_second"),
           "steps": state.get("global_step"), "tokens": tokens or None}
    if seconds and tokens:
        out["tokens_per_second"] = round(tokens / seconds, 1)
    return out


def write_run_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    logs = read_jsonl(run_dir / TRAINER_LOG)
    state, manifest = read_json(run_dir / TRAINER_STATE), read_json(run_dir / MANIFEST)
    data, results = read_json(run_dir / DATA_REPORT), read_json(run_dir / EVAL_DIR / RESULTS)
    lines = [f"# Run report: {run_dir.name}", ""]
    if plot_losses(logs, run_dir / LOSS_PLOT, stage_description(manifest)["loss"]):
        lines += ["![loss curves](loss_curves.png)", ""]
    if plot_preferences(logs, run_dir / PREFERENCE_PLOT):
        lines += ["![reward margins and preference accuracy](preference_curves.png)", ""]
    lines += ["## Data", ""]
    if data:
        from sftlab.data.report import datasets_table, replay_line, summary_line

        lines += [summary_line(data), ""] + ([replay_line(data), ""] if data.get("replay") else [])
        if len(data.get("datasets", {})) > 1:
            lines += datasets_table(data["datasets"]) + [""]
    lines += ["## Time and throughput", ""]
    speed = {**throughput(state, logs), "peak_memory_mb": manifest.get("peak_memory_mb"),
             "batches": manifest.get("batches", {}).get("summary"), "attention": manifest.get("attention")}
    lines += [f"- {key}: {value}" for key, value in speed.items() if value is not None] + [""]
    lines += retention_section(manifest.get("final_weights"))
    if results:
        lines += ["## Evaluation (held-out split)", "", "```", table_text(results), "```",
                  "", "Replies side by side: eval/report.md", ""]
    predictions = read_jsonl(run_dir / PREDICTIONS)
    if predictions:
        lines += ["## Probe replies over training", "", "| step | prompt | reply | end |", "| ---: | --- | --- | --- |"]
        for p in predictions:
            lines.append(f"| {p['step']}{' (final)' if p.get('final') else ''} | {markdown_cell(p['prompt'], 160)} | "
                         f"{markdown_cell(p['reply'], 160)} | {p['finish_reason']} |")
    write_atomic(run_dir / REPORT, "\n".join(lines) + "\n")
    return run_dir / REPORT


def retention_section(final: dict | None) -> list[str]:
    """report.md's table of the retention checks at saves and which checkpoint's weights are final."""
    if not final:
        return []
    lines = ["## Retention at saves and the final weights", "",
             "| step | verdict | retained | probe accuracy | loss rise | held-out loss |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for c in final["checks"]:
        numbers = [f"{c[k]:.0%}" if c.get(k) is not None else "n/a" for k in ("retained", "tuned_accuracy")]
        loss = "n/a" if c.get("eval_loss") is None else f"{c['eval_loss']:.4f}"
        lines.append(f"| {c['step']} | {c['verdict']} | {numbers[0]} | {numbers[1]} | {c['loss_rise']:+.3f} | "
                     f"{loss} |")
    return lines + ["", final_weights_line(final), ""]


def final_weights_line(final: dict) -> str:
    """One sentence: which weights are final, and by which rule (the report and the model card)."""
    if final.get("checkpoint") is None:
        return (f"Final weights: the last ones (step {final['step']}): no checkpoint's retention was kept "
                f"(rule: {final['rule']}).")
    return (f"Final weights: {final['checkpoint']} (step {final['step']}, retention {final['retention']}), "
            f"chosen by the rule: {final['rule']}.")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # CPU: the process's peak RSS


def library_versions() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(run_dir: Path, config: dict, fingerprint: str, seed: int, extra: dict | None = None) -> None:
    manifest = {"config": config, "data_fingerprint": fingerprint, "seed": seed, "libraries": library_versions(),
                "git_commit": git_commit(), "hardware": hardware(), **(extra or {})}
    write_json(Path(run_dir) / MANIFEST, manifest)
