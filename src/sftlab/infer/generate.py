"""Generation shared by chat, the training probes and evaluation: batched, left-padded, stops on all the
model's stop ids (the renderer's rule), returns only the new tokens."""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sftlab.chat_format import ChatRenderer


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop": ended on a stop token; "length": hit max_new_tokens
    new_tokens: int


SAMPLING_REPETITION_PENALTY = 1.2  # the tutorial's, when sampling


@dataclass
class SamplingArgs:
    """One rule for chat, eval, probes and the doctor: temperature 0 is greedy, and greedy means no
    repetition penalty unless one is given; sampling uses the tutorial's 1.2 unless one is given."""

    max_new_tokens: int = 1024
    temperature: float = 0.6  # 0 means greedy
    top_p: float = 0.8
    repetition_penalty: float | None = None

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return dict(do_sample=False, repetition_penalty=self.repetition_penalty or 1.0)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                    repetition_penalty=self.repetition_penalty or SAMPLING_REPETITION_PENALTY)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def decode_complete(tokenizer, ids: list[int]) -> str:
    """Decodes `ids`, leaving out a multi-byte character that a cut at max_new_tokens split (byte-level BPE
    would decode its first bytes as U+FFFD)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for cut in range(1, min(4, len(ids)) + 1):  # a UTF-8 character spans at most 4 byte tokens
        if not text.endswith("\ufffd"):
            break
        text = tokenizer.decode(ids[:-cut], skip_special_tokens=True)
    return text


def without_opening(text: str, opening: str) -> str:
    """Text of a reply, whole or so far, without the template's opening (Qwen3's empty think block) and leading
    whitespace; "" while what has come may still be a part of the opening (a stream holds it back)."""
    stripped, opening = text.lstrip(), opening.strip()
    if not opening:
        return stripped
    if stripped.startswith(opening):
        return stripped[len(opening):].lstrip()
    return "" if opening.startswith(stripped) else stripped


def reply_text(text: str, opening: str = "") -> str:
    """The whole reply without the template's opening and surrounding whitespace."""
    return without_opening(text, opening).strip()


def split_reply(tokenizer, new_ids: list[int], stop_ids: list[int], opening: str = "") -> Reply:
    """Cuts at the first stop token; the reply text excludes it and anything after (padding)."""
    for n, token_id in enumerate(new_ids):
        if token_id in stop_ids:
            return Reply(reply_text(tokenizer.decode(new_ids[:n], skip_special_tokens=True), opening), "stop", n + 1)
    return Reply(reply_text(decode_complete(tokenizer, new_ids), opening), "length", len(new_ids))


class TokenProgress:
    """A generate() streamer that moves a progress bar by one step per new token (one conversation)."""

    def __init__(self, total: int, desc: str):
        self.bar, self.prompt_seen = tqdm(total=total, desc=desc, unit="token", leave=False), False

    def put(self, value):
        if self.prompt_seen:  # generate() first hands the streamer the prompt
            self.bar.update(1)
        self.prompt_seen = True

    def end(self):
        self.bar.close()


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict]], sampling: SamplingArgs,
                     batch_size: int = 16, streamer=None, progress: str | None = None,
                     tools: list | None = None) -> list[Reply]:
    """Replies to each conversation (the last message is the user's). Runs in eval mode, then restores.
    `progress`: a description for a progress bar (per batch, or per token for one conversation); `tools`: per
    conversation, its tools or None."""
    tools = tools or [None] * len(conversations)
    renderer = ChatRenderer(tokenizer, generation_eos=model.generation_config.eos_token_id)
    stop_ids = renderer.stop_ids
    was_training = model.training
    model.eval()
    replies = []
    starts = range(0, len(conversations), batch_size)
    if progress and len(conversations) == 1 and streamer is None:
        streamer = TokenProgress(sampling.max_new_tokens, progress)
    elif progress:
        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    try:
        for start in starts:
            prompts = [renderer.prompt_ids(c, t) for c, t in zip(conversations[start:start + batch_size],
                                                                   tools[start:start + batch_size])]
            ids, mask = left_pad(prompts, tokenizer.pad_token_id, model.device)
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                # the Trainer sets config.use_cache to TrainingArguments.use_cache (False): without this, every
                # probe, retention check and final evaluation of a training run recomputed the whole sequence at
                # each new token (measured on SmolLM2-135M: 60 s against ~10 s a batch of 16 at 48 tokens)
                use_cache=True, **sampling.generate_kwargs(),
            )
            replies += [split_reply(tokenizer, row[ids.shape[1]:].tolist(), stop_ids, renderer.reply_opening)
                        for row in out]
    finally:
        model.train(was_training)
    return replies
