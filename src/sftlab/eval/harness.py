"""`sftlab eval --tasks`: lm-evaluation-harness tasks (MMLU, C-Eval, CMMLU, or a task YAML of your own) scored on
the same base and tuned models as the rest of the evaluation, through the harness's Python API (the `lm-eval`
package: `pip install 'sftlab[harness]'`), so its rows join the before/after table.

The models are handed to the harness already loaded (a LoRA run as the PEFT model: no merge, and no second
resolution of `base_model_name_or_path`, which other tools cannot resolve for sftlab's embedded models).
"""

from functools import lru_cache

from sftlab.errors import UserError


@lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lm-eval's task index (with the tasks in `include_path`); one line saying what to install without it."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError("--tasks runs lm-evaluation-harness, which is not installed: pip install 'sftlab[harness]' "
                        "(or pip install lm-eval)") from exc
    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], include_path: str | None = None, **_) -> None:
    """Every task name known to lm-eval: checked before any model is loaded."""
    unknown = [t for t in tasks if t not in task_manager(include_path).all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else " (a task of your own: --tasks_include DIR)"
        raise UserError(f"--tasks: no lm-eval task named {', '.join(unknown)} in lm-eval{where}")


def task_scores(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 8) -> tuple[dict, dict]:
    """({"task/metric": value}, {"task/metric": higher is better}) for `tasks` on `model`; standard errors are
    left out (the harness's bootstrap is off: it takes minutes and the table shows no intervals)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_tasks(tasks, include_path)
    manager = task_manager(include_path)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    except (ConnectionError, OSError) as exc:  # datasets' offline and connection errors are OSErrors
        first_line = (str(exc).splitlines() or [""])[0]
        raise UserError(f"--tasks {','.join(tasks)}: a task's dataset could not be loaded ({type(exc).__name__}: "
                        f"{first_line}); a task whose data is on the Hugging Face Hub needs it downloaded first (or "
                        "a task YAML in --tasks_include that points at local files)") from exc
    scores, higher = {}, {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric, comma, _ = key.partition(",")  # scores are "metric,filter"; alias, sample_len are not
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            scores[f"{task}/{metric}"] = round(float(value), 4)
            higher[f"{task}/{metric}"] = bool(out.get("higher_is_better", {}).get(task, {}).get(metric, True))
    return scores, higher
