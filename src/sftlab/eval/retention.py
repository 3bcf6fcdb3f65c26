"""Did tuning keep what the model knew? The most common way a real fine-tune fails is silent: the new skill is
learned and general ability is lost, and held-out metrics on the new data cannot show it. Two measures, base
against tuned, on general prompts:

- probe accuracy: the shipped probe set (retention_probes.jsonl: 60 short prompts, English and Chinese, facts,
  arithmetic, translation, instructions), each with an answer rule, answered greedily by both;
- loss rise: the tuned model's mean per-token loss on the base model's own greedy replies to those prompts, minus
  the base's loss on them (nats per token). It needs no answer key, so it works for any model, any language and
  any prompt file (--retention_data): what the base would say is what tuning should not make unlikely.

The verdict (`verdict`): kept, degraded or lost, from the retained share (of the probes the base answers
correctly, the share the tuned model still answers correctly: a gain elsewhere, such as a task the training data
teaches, must not hide a loss), the accuracy against the base's, and the loss rise;
the thresholds are stated beside it, with the measurements that set them in docs/evaluation.md (and, for the
retained share, how far chance reaches: Z_ONE_SIDED_95). n/a where the base answers fewer than MIN_BASE_CORRECT
probes (a randomly initialised model knows nothing to keep).
"""

import json
import math
import re
from dataclasses import dataclass
from importlib import resources

from sftlab.errors import UserError
from sftlab.eval.losses import sample_losses
from sftlab.infer.generate import SamplingArgs, generate_replies
from sftlab.model.load import as_started

PROBE_FILE = "retention_probes.jsonl"
MAX_NEW_TOKENS = 48  # the probes' answers are a word or a short sentence
# Verdict thresholds, set by benchmarks/retention_real.py (SmolLM2-135M; docs/evaluation.md, "Retention"): runs
# whose replies kept their answers measured a loss rise of -0.01 to +0.05; runs with visibly damaged answers ("100
# divided by 4 is 2", "the capital of Italy is SFR") +0.18 to +0.83 and a retained share of 57-78%; a run that
# lost most 43% and +1.47. A retained share is noisy at this size: runs whose loss rise was about zero (-0.003,
# +0.016) still flipped 3 of the 22 borderline answers the base had right (86% retained, while gaining 4 others),
# so the kept bound on it sits below that noise and above the damaged runs; the accuracy must also stay within 90%
# of the base's, so that answers gained elsewhere cannot hide many lost.
KEPT_SHARE, LOST_SHARE = 0.8, 0.5  # of the probes the base answers correctly, the share the tuned model still does
KEPT_ACCURACY = 0.9  # the tuned model's probe accuracy, at least this share of the base's
KEPT_RISE, LOST_RISE = 0.25, 1.0  # loss rise, nats per token of the base's own replies
MIN_BASE_CORRECT = 5  # fewer probes right than this: the base knows too little for the accuracy to say anything
# Over the ~20 probes a small base answers the retained share is noisy (one answer is 5 points): the verdict's line
# gives its one-sided 95% Wilson upper bound beside it, so a reader sees how far chance reaches. It does not move the
# verdict: under replay the loss rise falls while answers are lost (docs/evaluation.md, "The real-model recipe,
# cross-validated"), so it cannot vouch for a shortfall, and a rule that let it do so was measured and not adopted.
Z_ONE_SIDED_95 = 1.645


@dataclass
class Probe:
    messages: list[dict]  # the conversation to reply to
    rule: dict | None  # {"any": [...]} or {"all": [str | [alternatives]]}; None: no answer key (loss rise only)

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def shipped_probes() -> list[Probe]:
    text = resources.files("sftlab.eval").joinpath(PROBE_FILE).read_text(encoding="utf-8")
    return [Probe([{"role": "user", "content": row["prompt"]}], answer_rule(row, PROBE_FILE))
            for row in map(json.loads, text.splitlines()) if row]


def answer_rule(row, where: str) -> dict | None:
    """A row's answer rule: `any` (one of these strings) and/or `all` (each item: a string, or a list of
    alternatives), or None when it has neither; a malformed one is an error naming `where` (file:line) and the
    field, never a check silently skipped."""
    if not isinstance(row, dict):
        return None
    for key in ("any", "all"):
        value = row.get(key)
        if value is not None and not (isinstance(value, list) and value and all(
                isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(a, str) for a in v))
                for v in value)):
            raise UserError(f"{where}: field {key}: expected a non-empty list of strings, got {value!r}")
    return {k: row[k] for k in ("any", "all") if k in row} or None


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
    scored = [(i, [*c, {"role": "assistant", "content": r.text}])
              for i, (c, r) in enumerate(zip(conversations(probes, system_prompt), replies)) if r.text.strip()]
    losses = [None] * len(probes)
    for (i, _), (total, tokens) in zip(scored, sample_losses(model, tokenizer, [c for _, c in scored])):
        losses[i] = total / tokens
    return losses


def adapter_retention(model, tokenizer, system_prompt: str | None = None, probes: list[Probe] | None = None,
                      batch_size: int = 16) -> dict:
    """Retention of a PEFT model against the model its stage started from (as_started: the adapter disabled,
    modules_to_save copies too, or the frozen copy of the adapter a DPO run went on training): the run's final
    evaluation checks it without a second model in memory."""
    probes = probes if probes is not None else shipped_probes()
    with as_started(model):
        base = answer(model, tokenizer, probes, system_prompt, batch_size, "base")
        if knows_too_little(probes, base):
            return unknowing_base(probes, base)
        base_losses = reply_losses(model, tokenizer, probes, base, system_prompt)
    tuned = answer(model, tokenizer, probes, system_prompt, batch_size, "tuned")
    tuned_losses = reply_losses(model, tokenizer, probes, base, system_prompt)
    return summarize(probes, base, tuned, base_losses, tuned_losses)


def verdict(retained: float | None, loss_rise: float, accuracies: tuple[float, float] | None = None,
            base_correct: int | None = None) -> tuple[str, str]:
    """(kept | degraded | lost, why): lost when a measure says lost; kept when every measure says kept: the
    retained share, the accuracy against the base's (`accuracies`: base, tuned) and the loss rise. `retained` and
    `accuracies` are None without an answer key. `base_correct` (the probes the base answers): the line then gives
    how many, and how far above the measured share chance could reach (its one-sided 95% Wilson upper bound)."""
    ratio = accuracies[1] / accuracies[0] if accuracies and accuracies[0] else None
    if (retained is not None and retained < LOST_SHARE) or loss_rise > LOST_RISE:
        word = "lost"
    elif ((retained is None or retained >= KEPT_SHARE) and (ratio is None or ratio >= KEPT_ACCURACY)
          and loss_rise <= KEPT_RISE):
        word = "kept"
    else:
        word = "degraded"
    counted = "" if base_correct is None else f"{base_correct} "
    chance = ("" if retained is None or base_correct is None else
              f", chance reaches {wilson_upper(retained, base_correct):.0%}")
    share = ("" if retained is None else
             f"retained {retained:.0%} of the {counted}probes the base answers (kept >= {KEPT_SHARE:.0%}, lost < "
             f"{LOST_SHARE:.0%}{chance}); ")
    accuracy = ("" if accuracies is None else f"; accuracy {accuracies[0]:.0%} -> {accuracies[1]:.0%} (kept: at "
                f"least {KEPT_ACCURACY:.0%} of the base's)")
    return word, (f"{share}loss rise on the base's own replies {loss_rise:+.3f} nats/token (kept <= {KEPT_RISE}, "
                  f"lost > {LOST_RISE}){accuracy}")


def wilson_upper(share: float, n: int, z: float = Z_ONE_SIDED_95) -> float:
    """The Wilson score interval's upper bound for a share measured over n trials."""
    if n <= 0:
        return 1.0
    centre = share + z * z / (2 * n)
    spread = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def knows_too_little(probes: list[Probe], base: list) -> bool:
    """True when the probes have answer keys and the base answers fewer than MIN_BASE_CORRECT of them: a randomly
    initialised or tiny base has nothing to keep, and the rest of the check (the tuned side, the losses) is skipped."""
    keyed = [i for i, p in enumerate(probes) if p.rule]
    return bool(keyed) and sum(correct(probes[i].rule, base[i].text) for i in keyed) < MIN_BASE_CORRECT


def unknowing_base(probes: list[Probe], base: list) -> dict:
    keyed = [i for i, p in enumerate(probes) if p.rule]
    right = sum(correct(probes[i].rule, base[i].text) for i in keyed)
    return {"probes": len(probes), "answer_keyed": len(keyed), "base_accuracy": round(right / len(keyed), 4),
            "tuned_accuracy": None, "retained": None, "loss_rise": None, "verdict": "n/a",
            "why": f"the base answers only {right} of {len(keyed)} general probes: it knows too little for a "
                   "retention check to mean anything", "worst": [],
            "per_probe": [{"prompt": p.prompt, "base": b.text, "tuned": None,
                           "base_correct": correct(p.rule, b.text) if p.rule else None, "tuned_correct": None,
                           "loss_rise": None} for p, b in zip(probes, base)]}


def summarize(probes: list[Probe], base: list, tuned: list, base_losses: list, tuned_losses: list) -> dict:
    """The retention record for results.json: both accuracies (over the probes with an answer key), the loss
    rise (over the probes the base replied to), the verdict, and the worst three probes, base vs tuned."""
    keyed = [i for i, p in enumerate(probes) if p.rule]
    base_ok = {i for i in keyed if correct(probes[i].rule, base[i].text)}
    tuned_ok = {i for i in keyed if correct(probes[i].rule, tuned[i].text)}
    scored = [i for i in range(len(probes)) if base_losses[i] is not None]
    rises = {i: tuned_losses[i] - base_losses[i] for i in scored}
    rise = sum(rises.values()) / len(rises) if rises else 0.0  # 0.0: the base replied to no probe
    base_accuracy = len(base_ok) / len(keyed) if keyed else None
    tuned_accuracy = len(tuned_ok) / len(keyed) if keyed else None
    retained = round(len(base_ok & tuned_ok) / len(base_ok), 6) if base_ok else None
    word, why = verdict(retained, rise, (base_accuracy, tuned_accuracy) if keyed else None,
                        len(base_ok) if base_ok else None)
    worst = sorted(scored, key=lambda i: (i in base_ok and i not in tuned_ok, rises[i]), reverse=True)[:3]
    return {
        "probes": len(probes), "answer_keyed": len(keyed),
        "base_accuracy": None if base_accuracy is None else round(base_accuracy, 4),
        "tuned_accuracy": None if tuned_accuracy is None else round(tuned_accuracy, 4),
        "retained": None if retained is None else round(retained, 4),
        "loss_rise": round(rise, 4), "verdict": word, "why": why,
        "worst": [{"prompt": probes[i].prompt, "base": base[i].text, "tuned": tuned[i].text,
                   "loss_rise": round(rises[i], 4)} for i in worst],
        "per_probe": [{"prompt": p.prompt, "base": base[i].text, "tuned": tuned[i].text,
                       "base_correct": i in base_ok if p.rule else None,
                       "tuned_correct": i in tuned_ok if p.rule else None,
                       "loss_rise": None if i not in rises else round(rises[i], 4)} for i, p in enumerate(probes)],
    }


def retention_lines(record: dict) -> list[str]:
    """The verdict and the worst probes, as printed by `sftlab eval` and written into report.md."""
    lines = [f"retention: {record['verdict'].upper()}: {record['why']} ({record['probes']} general probes)"]
    if record["verdict"] == "n/a":
        return lines
    for item in record["worst"]:
        lines.append(f"  {item['prompt']!r} (loss rise {item['loss_rise']:+.2f})")
        lines.append(f"    base:  {item['base'][:100]!r}")
        lines.append(f"    tuned: {item['tuned'][:100]!r}")
    return lines
