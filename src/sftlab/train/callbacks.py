"""Trainer callbacks: the probe replies at every save, and a JSON-lines copy of the trainer's logs."""

from pathlib import Path

from transformers import TrainerCallback

from sftlab.infer.generate import SamplingArgs, generate_replies
from sftlab.model.load import with_system_prompt
from sftlab.run_dir import PREDICTIONS, TRAINER_LOG, append_jsonl

DEFAULT_PROBES = ["你好，告诉我你的名字。", "告诉我1+2等于多少？"]  # the tutorial's two probe prompts


def run_probes(model, tokenizer, prompts: list[str], max_new_tokens: int, system_prompt: str | None = None):
    conversations = [with_system_prompt([{"role": "user", "content": p}], system_prompt) for p in prompts]
    sampling = SamplingArgs(max_new_tokens=max_new_tokens, temperature=0)
    return generate_replies(model, tokenizer, conversations, sampling)


def probe_records(step: int, prompts: list[str], replies: list, final: bool = False) -> list[dict]:
    """predictions.jsonl's records: one per probe prompt, `final` for those after training."""
    return [dict(step=step, prompt=p, reply=r.text, finish_reason=r.finish_reason, new_tokens=r.new_tokens,
                 **({"final": True} if final else {})) for p, r in zip(prompts, replies)]


class ProbeCallback(TrainerCallback):
    """At each save: greedy replies to the probe prompts, appended to predictions.jsonl and sent to SwanLab.

    Unlike the tutorial's callback, it generates in eval mode (no dropout), batched with left padding,
    decodes only the new tokens, and stops on the model family's stop tokens (GLM-4's three, Qwen's, ...)."""

    def __init__(self, tokenizer, prompts: list[str], max_new_tokens: int, output_dir: str,
                 system_prompt: str | None = None, stopper=None):
        self.tokenizer, self.prompts, self.max_new_tokens = tokenizer, prompts, max_new_tokens
        self.path = Path(output_dir) / PREDICTIONS
        self.system_prompt = system_prompt
        self.stopper = stopper  # a StopOnSignal: the save that a stop signal asks for is not probed

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.prompts or not state.is_world_process_zero or getattr(self.stopper, "stopping", False):
            return
        replies = run_probes(model, self.tokenizer, self.prompts, self.max_new_tokens, self.system_prompt)
        append_jsonl(self.path, probe_records(state.global_step, self.prompts, replies))
        log_text_to_swanlab([f"{p}\n→ {r.text}" for p, r in zip(self.prompts, replies)], state.global_step)


def log_text_to_swanlab(texts: list[str], step: int) -> None:
    from sftlab.train.tracking import active_swanlab

    swanlab = active_swanlab()
    if swanlab is not None:
        swanlab.log({"Prediction": [swanlab.Text(t) for t in texts]}, step=step)


class JsonlLogCallback(TrainerCallback):
    """Appends each log record (loss, lr, eval_loss, ...) to trainer_log.jsonl as it happens."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / TRAINER_LOG

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, [{"step": state.global_step, "epoch": state.epoch, **logs}])
