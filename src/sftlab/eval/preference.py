"""Judging a preference-tuned model on held-out pairs: how much more the policy prefers each chosen reply over its
rejected one than the reference (the model before tuning) did.

Per pair, with log p the summed log-probability of a reply's tokens (through its terminator) after the prompt:
    margin = beta * ((log p_policy(chosen) - log p_ref(chosen)) - (log p_policy(rejected) - log p_ref(rejected)))
which is the implicit-reward margin DPO trains on (TRL logs its batch mean as rewards/margins). Reported:
- preference_accuracy: the share of pairs with a positive margin, a tie counting half (a coin flip): before
  tuning the policy is the reference, every margin is 0, and the accuracy is 0.5, chance;
- mean_margin: the mean margin;
- chosen_preferred: the share of pairs whose chosen reply has the higher mean log-probability per token under the
  model itself, no reference: what the model prefers on its own, before and after.
The layout of a batch is TRL's DPO collator's (chosen rows, then rejected rows, right-padded), so the log
probabilities here are the ones DPO's loss is computed from (tests/train/test_dpo.py checks the loss equal).
"""

import contextlib

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sftlab.model.load import as_started


def collate_pairs(pairs: list[dict], pad_token_id: int) -> dict:
    """Rendered pairs (prompt_ids, chosen_ids, rejected_ids) -> input_ids, attention_mask and completion_mask:
    the chosen sequences first, then the rejected ones, right-padded to the longest."""
    rows = [p["prompt_ids"] + p["chosen_ids"] for p in pairs] + [p["prompt_ids"] + p["rejected_ids"] for p in pairs]
    replies = [len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, reply) in enumerate(zip(rows, replies)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        completion_mask[i, len(row) - reply:len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its completion tokens, and how many there are."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False).logits.float()
    targets = batch["input_ids"][:, 1:].to(device)
    mask = batch["completion_mask"][:, 1:].to(device)
    token_logps = torch.gather(F.log_softmax(logits[:, :-1], dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


def dpo_sigmoid_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's loss (loss_type sigmoid) from per-row log-probabilities in the collator's layout."""
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


@torch.no_grad()
def pair_logps(model, pairs: list[dict], pad_token_id: int, batch_size: int = 8, progress: str | None = None
               ) -> tuple[list[float], list[float], list[int], list[int]]:
    """Over `pairs`: (chosen log p, rejected log p, chosen tokens, rejected tokens), each a list per pair."""
    model.eval()
    chosen, rejected, chosen_n, rejected_n = [], [], [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc=progress, unit="batch", leave=False,
                      disable=not progress):
        logps, counts = sequence_logps(model, collate_pairs(pairs[start:start + batch_size], pad_token_id))
        for values, halves in ((logps.tolist(), (chosen, rejected)), (counts.tolist(), (chosen_n, rejected_n))):
            half = len(values) // 2
            halves[0].extend(values[:half])
            halves[1].extend(values[half:])
    return chosen, rejected, chosen_n, rejected_n


def preference_scores(policy: tuple, reference: tuple, beta: float) -> dict:
    """The scores of the module docstring from pair_logps of the policy and of the reference."""
    chosen, rejected, chosen_n, rejected_n = policy
    ref_chosen, ref_rejected = reference[0], reference[1]
    margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)]
    n = len(margins)
    wins = sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)
    prefers = sum(c / max(cn, 1) > r / max(rn, 1) for c, r, cn, rn in zip(chosen, rejected, chosen_n, rejected_n))
    return {"preference_accuracy": round(wins / n, 4), "mean_margin": round(sum(margins) / n, 4),
            "chosen_preferred": round(prefers / n, 4)}


def judge_pairs(model, pairs: list[dict], pad_token_id: int, beta: float, reference=None) -> dict:
    """{"base": scores of the reference, "tuned": scores of the policy} on rendered held-out pairs. `reference`:
    the reference model, or None for a LoRA policy, whose reference is the policy as it started (as_started: its
    adapter disabled, or the frozen copy of the adapter it went on training)."""
    tuned = pair_logps(model, pairs, pad_token_id, progress="tuned preferences")
    with (as_started(model) if reference is None else contextlib.nullcontext()):
        ref = pair_logps(reference or model, pairs, pad_token_id, progress="reference preferences")
    return {"base": preference_scores(ref, ref, beta), "tuned": preference_scores(tuned, ref, beta)}
