"""Model-based scores of instruction data: instruction-following difficulty (IFD) and a relevance check that finds
rows whose response belongs to another instruction.

For each row, the scorer (a small causal LM; by default the embedded SmolLM2-135M) reads its last assistant reply:
- `loss_conditioned`: the mean per-token loss of the reply given everything before it, rendered with the scorer's
  own chat template by the one renderer (its generation prompt and what the template writes before a reply);
- `loss_unconditioned`: the mean loss of the same reply tokens alone, after the tokenizer's BOS token where it has
  one (Cherry LLM's and Superfiltering's definition);
- `ifd` = loss_conditioned / loss_unconditioned: how little the instruction helps; a high IFD marks a hard row;
- `loss_other`: the reply's mean loss under `others` instructions drawn at random from a pool of the data's rows,
  and `relevance` = loss_conditioned / loss_other: does its own instruction help more than a stranger's?
- `best_other_ratio`: loss_conditioned over the reply's lowest loss under any of those instructions and those of
  the `likest` pool rows most like the reply (by shared character pairs of their instruction and reply, which
  needs no word splitting in Chinese): over 1, another instruction of the data explains it better.

IFD alone ranks rows whose reply belongs to another instruction at the top (the instruction does not help, so
their IFD is near 1). A row is `misaligned` when its IFD is at or over 1 (its instruction makes the reply less
likely), its relevance at or over `misaligned_relevance`, or its best-other ratio at or over `misaligned_ratio`.
Neither ratio alone serves: rows that share one reply across many instructions (an identity data set: "Who are
you?", "Introduce yourself.") are helped as much by each other's instructions as by their own, so a stranger's
instruction cannot tell them from a shuffled row; the instruction a shuffled reply came from can, when the pool
holds it (docs/data.md, "Scoring and selecting rows", has the measured recall and false positives).

The reply tokens are its text tokenized alone (no special tokens), the same ids in every condition, so the three
losses are over the same tokens; where the tokenizer has no BOS token, the first reply token has nothing to be
predicted from alone, and is left out of every loss. Multi-turn rows: the last assistant reply, given every turn
before it. A reply that is a tool call alone is scored on its calls as JSON text.
"""

import json
import random
from collections import Counter
from dataclasses import dataclass

from sftlab.chat_format import ChatRenderer


@dataclass
class ScoreInputs:
    """One row, tokenized for scoring: the conditioning prompt and the reply."""

    prompt_ids: list[int]
    response_ids: list[int]


def last_reply(messages: list[dict]) -> tuple[list[dict], str]:
    """(every message before the last assistant message, that message's text)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    message = messages[last]
    text = message.get("content") or ""
    if not text.strip() and message.get("tool_calls"):
        text = json.dumps(message["tool_calls"], ensure_ascii=False)
    return messages[:last], text


def score_inputs(renderer: ChatRenderer, history: list[dict], reply: str, tools: list | None) -> ScoreInputs:
    """The ids of the conversation before the reply (with the template's generation prompt) and of the reply."""
    prompt = renderer.render_text(history, tools, add_generation_prompt=True) + renderer.reply_opening
    return ScoreInputs(renderer.encode(prompt), renderer.tokenizer.encode(reply, add_special_tokens=False))


def sequences_for(row: ScoreInputs, others: list[list[int]], bos_id: int | None) -> list[tuple[list[int], int]]:
    """(ids, index of the first scored token) for: the reply after its own prompt, the reply alone, the reply after
    each other prompt. Without a BOS token the reply's first token is scored in none of them."""
    skip = 0 if bos_id is not None else 1
    alone = ([bos_id] if bos_id is not None else []) + row.response_ids
    own = [(row.prompt_ids + row.response_ids, len(row.prompt_ids) + skip), (alone, 1)]
    return own + [(prompt + row.response_ids, len(prompt) + skip) for prompt in others]


def token_budget_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so each padded batch holds at most `max_tokens` (a longer one alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    return groups + ([current] if current else [])


def mean_losses(model, sequences: list[tuple[list[int], int]], pad_id: int, max_tokens: int) -> list[float]:
    """Per sequence, the mean cross-entropy of its tokens from its scored index on, each predicted from the ones
    before it (no gradient; padded on the right, so a token sees only what precedes it)."""
    import torch

    losses = [float("nan")] * len(sequences)
    with torch.no_grad():
        for group in token_budget_groups([len(ids) for ids, _ in sequences], max_tokens):
            width = max(len(sequences[i][0]) for i in group)
            ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            scored = torch.zeros((len(group), width), dtype=torch.bool)
            for row, i in enumerate(group):
                tokens, start = sequences[i]
                ids[row, :len(tokens)] = torch.tensor(tokens)
                mask[row, :len(tokens)] = 1
                scored[row, start:len(tokens)] = True
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
            token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(model.device),
                                                           reduction="none").cpu()
            weights = scored[:, 1:].float()
            means = (token_loss * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
            for row, i in enumerate(group):
                losses[i] = float(means[row]) if weights[row].sum() > 0 else float("nan")
    return losses


def char_pairs(text: str) -> set[str]:
    """The text's pairs of adjacent characters, lower-cased: a likeness that needs no word splitting (Chinese)."""
    text = " ".join(text.lower().split())
    return {text[i:i + 2] for i in range(len(text) - 1)}


class Pool:
    """Rows whose instructions are tried on every row's reply: their prompt ids, and an index of the character
    pairs of each one's instruction and reply, to find the rows most like a reply. Indexing the pool rows' replies
    too finds, for a shuffled reply that does not echo its question ("I am Orion, ..." under "What is 1+3?"), the
    rows that give such replies, whose instructions explain it (measured: it halved the false positives of
    indexing the instructions alone, at a higher recall)."""

    def __init__(self, prompts: dict[int, list[int]], instructions: dict[int, str], replies: dict[int, str]):
        self.prompts = prompts
        self.indices = sorted(prompts)
        self.instructions = instructions
        self.pairs = {i: char_pairs(f"{instructions[i]} {replies[i]}") for i in self.indices}
        self.postings: dict[str, list[int]] = {}
        for i, pairs in self.pairs.items():
            for pair in pairs:
                self.postings.setdefault(pair, []).append(i)

    def random_others(self, index: int, count: int, seed: int) -> list[int]:
        """`count` pool rows other than `index`, drawn with a seed of the row's own."""
        candidates = [i for i in self.indices if i != index]
        return random.Random(f"{seed}:{index}").sample(candidates, min(count, len(candidates)))

    def likest(self, index: int, reply: str, instruction: str, count: int) -> list[int]:
        """The `count` pool rows (not `index`, nor one with the same instruction) whose instruction and reply share
        the most character pairs with `reply`, as a share of both (Jaccard)."""
        pairs = char_pairs(reply)
        shared = Counter(i for pair in pairs for i in self.postings.get(pair, ()))
        ranked = sorted(((n / (len(pairs) + len(self.pairs[i]) - n), -i) for i, n in shared.items()
                         if i != index and self.instructions[i] != instruction), reverse=True)
        return [-negative for _, negative in ranked[:count]]


def row_scores(losses: list[float], random_count: int, response_tokens: int, max_relevance: float,
               max_ratio: float) -> dict:
    """The scores of one row from its sequences' losses: own prompt, alone, `random_count` random prompts, then the
    prompts most like its reply."""
    conditioned, alone, *others = [x if x == x else None for x in losses]  # NaN: nothing was scored
    strangers = [x for x in others[:random_count] if x is not None]
    tried = [x for x in others if x is not None]
    other = sum(strangers) / len(strangers) if strangers else None
    ifd = conditioned / alone if conditioned is not None and alone else None
    relevance = conditioned / other if conditioned is not None and other else None
    best_ratio = conditioned / min(tried) if conditioned is not None and tried and min(tried) > 0 else None
    misaligned = ((ifd is not None and ifd >= 1.0) or (relevance is not None and relevance >= max_relevance)
                  or (best_ratio is not None and best_ratio >= max_ratio))
    return {"loss_conditioned": _round(conditioned), "loss_unconditioned": _round(alone), "ifd": _round(ifd),
            "loss_other": _round(other), "relevance": _round(relevance), "best_other_ratio": _round(best_ratio),
            "response_tokens": response_tokens, "misaligned": misaligned}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


@dataclass
class ScoreSettings:
    others: int  # instructions drawn at random
    likest: int  # instructions of the rows likest the reply
    seed: int
    max_relevance: float
    max_ratio: float
    max_tokens: int


def score_batch(model, renderer: ChatRenderer, rows: list[tuple[int, ScoreInputs, str, str]], pool: Pool,
                settings: ScoreSettings) -> list[dict]:
    """The scores of `rows`: (index in the data, inputs, instruction text, reply text) each."""
    bos = renderer.tokenizer.bos_token_id
    sequences, spans = [], []
    for index, inputs, instruction, reply in rows:
        drawn = pool.random_others(index, settings.others, settings.seed)
        alike = [i for i in pool.likest(index, reply, instruction, settings.likest + len(drawn)) if i not in drawn]
        prompts = [pool.prompts[i] for i in drawn + alike[:settings.likest]]
        seqs = sequences_for(inputs, prompts, bos)
        spans.append((len(sequences), len(seqs), len(drawn)))
        sequences += seqs
    tokenizer = renderer.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = mean_losses(model, sequences, pad, settings.max_tokens)
    return [row_scores(losses[start:start + n], drawn, len(inputs.response_ids), settings.max_relevance,
                       settings.max_ratio)
            for (start, n, drawn), (_, inputs, _, _) in zip(spans, rows)]


def instruction_of(history: list[dict]) -> str:
    """The last user message's text: what a reply answers."""
    users = [m.get("content") or "" for m in history if m["role"] == "user"]
    return users[-1] if users else ""
