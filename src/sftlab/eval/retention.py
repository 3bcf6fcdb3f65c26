"""Did tuning keep what the model knew? The most common way a real fine-tune fails is silent: the new skill is
learned and general ability is lost, and held-out metrics on the new data cannot show it. Two measures, base
against tuned, on general prompts:

- probe accuracy: the shipped probe set (retention_probes.jsonl: 60 short prompts, English and Chinese, facts,
  arithmetic, translation, instructions), each with an answer rule, answered greedily by both;
- loss rise: the tuned model's mean per-token loss on the base model's own greedy replies to those prompts, minus
  the base's loss on them (nats per token). It needs no answer key, so it works for any model, any language and
  any prompt file (--retention_data): what the base would say is what tuning should not make unlikely.

The verdict (`verdict`): kept, degraded or lost, from the accuracy ratio (tuned over base) and the loss rise;
the thresholds are stated beside it, with the measurements that set them in the README. n/a where the base
answers fewer than MIN_BASE_CORRECT probes (a randomly initialised model knows nothing to keep).
"""

import json
import re
from dataclasses import dataclass
from importlib import resources

from sftlab.infer.generate import SamplingArgs, generate_replies

PROBE_FILE = "retention_probes.jsonl"
MAX_NEW_TOKENS = 48  # the probes' answers are a word or a short sentence
# verdict thresholds (see the README's "Retention" section for the runs that set them)
KEPT_RATIO, LOST_RATIO = 0.9, 0.5  # tuned probe accuracy over the base's
KEPT_RISE, LOST_RISE = 0.5, 1.5  # loss rise, nats per token of the base's own replies
MIN_BASE_CORRECT = 5  # fewer probes right than this: the base knows too little for the accuracy to say anything


@dataclass
class Probe:
    messages: list[dict]  # the conversation to reply to
    rule: dict | None  # {"any": [...]} or {"all": [str | [alternatives]]}; None: no answer key (loss rise only)

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def shipped_probes() -> list[Probe]:
    text = resources.files("sftlab.eval").joinpath(PROBE_FILE).read_text(encoding="utf-8")
    return [Probe([{"role": "user", "content": row["prompt"]}], {k: row[k] for k in ("any", "all") if k in row})
            for row in map(json.loads, text.splitlines()) if row]


def probes_from(conversations_with_replies: list[list[dict]]) -> list[Probe]:
    """A user's retention file, read like any data file: each conversation without its last reply, with no
    answer key (the loss rise needs none)."""
    return [Probe(c[:-1], None) for c in conversations_with_replies]


def _found(answer: str, reply: str) -> bool:
    """`answer` in `reply`, case-insensitive; a Latin or digit answer as a whole word ("5" is not in "15")."""
    if re.fullmatch(r"[\w\s.+-]+", answer, re.ASCII):
        return re.search(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", reply, re.IGNORECASE) is not None
    return answer.lower() in reply.lower()


def correct(rule: dict, reply: str) -> bool:
    if "all" in rule:
        return all(any(_found(a, reply) for a in ([item] if isinstance(item, str) else item)) for item in rule["all"])
    return any(_found(a, reply) for a in rule["any"])


def conversations(probes: list[Probe], system_prompt: str | None = None) -> list[list[dict]]:
    """The probes as the model is asked them: with the run's system prompt where they have none, as in chat."""
    from sftlab.model.load import with_system_prompt

    return [with_system_prompt(p.messages, system_prompt) for p in probes]


def answer(model, tokenizer, probes: list[Probe], system_prompt: str | None = None, batch_size: int = 16,
           label: str = "") -> list:
    greedy = SamplingArgs(max_new_tokens=MAX_NEW_TOKENS, temperature=0)
    return generate_replies(model, tokenizer, conversations(probes, system_prompt), greedy, batch_size=batch_size,
                            progress=f"{label} retention".strip())


def reply_losses(model, tokenizer, probes: list[Probe], replies: list, system_prompt: str | None = None) -> list:
    """Per probe, the mean per-token loss of `model` on the reply (the base's) and its terminator, as in training;
    None for an empty reply."""
    from sftlab.eval.evaluate import sample_losses

    scored = [(i, [*c, {"role": "assistant", "content": r.text}])
              for i, (c, r) in enumerate(zip(conversations(probes, system_prompt), replies)) if r.text.strip()]
    losses = [None] * len(probes)
    for (i, _), (total, tokens) in zip(scored, sample_losses(model, tokenizer, [c for _, c in scored])):
        losses[i] = total / tokens
    return losses


def adapter_retention(model, tokenizer, system_prompt: str | None = None, probes: list[Probe] | None = None,
                      batch_size: int = 16) -> dict:
    """Retention of a PEFT model against its own base, the adapter disabled (modules_to_save copies too): the
    run's final evaluation checks it without a second model in memory."""
    probes = probes if probes is not None else shipped_probes()
    with model.disable_adapter():
        base = answer(model, tokenizer, probes, system_prompt, batch_size, "base")
        base_losses = reply_losses(model, tokenizer, probes, base, system_prompt)
    tuned = answer(model, tokenizer, probes, system_prompt, batch_size, "tuned")
    tuned_losses = reply_losses(model, tokenizer, probes, base, system_prompt)
    return summarize(probes, base, tuned, base_losses, tuned_losses)


def verdict(base_accuracy: float | None, tuned_accuracy: float | None, loss_rise: float) -> tuple[str, str]:
    """(kept | degraded | lost, why): lost when either measure says lost, kept when both say kept."""
    ratio = None if not base_accuracy or tuned_accuracy is None else round(tuned_accuracy / base_accuracy, 6)
    if (ratio is not None and ratio < LOST_RATIO) or loss_rise > LOST_RISE:
        word = "lost"
    elif (ratio is None or ratio >= KEPT_RATIO) and loss_rise <= KEPT_RISE:
        word = "kept"
    else:
        word = "degraded"
    accuracy = ("" if ratio is None else
                f"probe accuracy {tuned_accuracy:.0%} vs the base's {base_accuracy:.0%} (ratio {ratio:.2f}; kept "
                f">= {KEPT_RATIO}, lost < {LOST_RATIO}); ")
    return word, (f"{accuracy}loss rise on the base's own replies {loss_rise:+.3f} nats/token (kept <= {KEPT_RISE}, "
                  f"lost > {LOST_RISE})")


def summarize(probes: list[Probe], base: list, tuned: list, base_losses: list, tuned_losses: list) -> dict:
    """The retention record for results.json: both accuracies (over the probes with an answer key), the loss
    rise (over the probes the base replied to), the verdict, and the worst three probes, base vs tuned."""
    keyed = [i for i, p in enumerate(probes) if p.rule]
    base_ok = {i for i in keyed if correct(probes[i].rule, base[i].text)}
    tuned_ok = {i for i in keyed if correct(probes[i].rule, tuned[i].text)}
    scored = [i for i in range(len(probes)) if base_losses[i] is not None]
    rises = {i: tuned_losses[i] - base_losses[i] for i in scored}
    rise = sum(tuned_losses[i] for i in scored) / len(scored) - sum(base_losses[i] for i in scored) / len(scored)
    base_accuracy = len(base_ok) / len(keyed) if keyed else None
    tuned_accuracy = len(tuned_ok) / len(keyed) if keyed else None
    word, why = verdict(base_accuracy, tuned_accuracy, rise)
    if keyed and len(base_ok) < MIN_BASE_CORRECT:  # a randomly initialised or tiny base: nothing to keep
        word, why = "n/a", (f"the base answers only {len(base_ok)} of {len(keyed)} general probes: it knows too "
                            f"little for a retention check to mean anything (loss rise {rise:+.3f} nats/token)")
    worst = sorted(scored, key=lambda i: (i in base_ok and i not in tuned_ok, rises[i]), reverse=True)[:3]
    return {
        "probes": len(probes), "answer_keyed": len(keyed),
        "base_accuracy": None if base_accuracy is None else round(base_accuracy, 4),
        "tuned_accuracy": None if tuned_accuracy is None else round(tuned_accuracy, 4),
        "loss_rise": round(rise, 4), "verdict": word, "why": why,
        "worst": [{"prompt": probes[i].prompt, "base": base[i].text, "tuned": tuned[i].text,
                   "loss_rise": round(rises[i], 4)} for i in worst],
    }


def retention_lines(record: dict) -> list[str]:
    """The verdict and the worst probes, as printed by `sftlab eval` and written into report.md."""
    lines = [f"retention: {record['verdict'].upper()}: {record['why']} ({record['probes']} general probes)"]
    for item in record["worst"]:
        lines.append(f"  {item['prompt']!r} (loss rise {item['loss_rise']:+.2f})")
        lines.append(f"    base:  {item['base'][:100]!r}")
        lines.append(f"    tuned: {item['tuned'][:100]!r}")
    return lines
