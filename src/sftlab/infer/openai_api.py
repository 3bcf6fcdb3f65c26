"""OpenAI's request and response shapes as `sftlab serve` speaks them: chat completions and (legacy) completions,
what each accepts, and the pieces of a response that agents and evaluation harnesses read (tool calls,
log-probabilities).

A parameter the server does not honour is a 400 that names it, never silently ignored: a harness that asks for
logprobs or a penalty and gets an answer without them would score garbage. Only fields that change nothing here
(`user`, `metadata`, `store`, ...) are accepted and ignored.
"""

import json
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sftlab.infer.generate import SamplingArgs

DEFAULTS = SamplingArgs()
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options", "prompt_cache_key",
           "safety_identifier"}  # they change nothing in what a single local model generates
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; 5 for completions


class Request(BaseModel):
    """What both routes share."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float = Field(DEFAULTS.temperature, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(DEFAULTS.top_p, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="torch's seeds: 64 bits.")
    n: int = Field(1, ge=1)
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    def unsupported(self) -> list[str]:
        """The parameters given that this server would not honour."""
        names = sorted(set(self.model_extra or {}) - IGNORED)
        names += [name for name, value in (("n (only 1)", self.n != 1),
                                           ("presence_penalty", self.presence_penalty != 0),
                                           ("frequency_penalty", self.frequency_penalty != 0),
                                           ("logit_bias", bool(self.logit_bias))) if value]
        return names

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: a system message (OpenAI's o1+)
    content: str | list[dict] | None = None


class ChatRequest(Request):
    """OpenAI's chat completion request."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        if self.tool_choice not in (None, "auto", "none"):
            names.append("tool_choice (only auto and none)")
        if self.response_format not in (None, {"type": "text"}):
            names.append("response_format (only text)")
        if self.stream and self.logprobs:
            names.append("logprobs with stream")
        return names

    @property
    def wants_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(Request):
    """OpenAI's (legacy) completion request: raw text or token ids in, no chat template; what lm-eval's
    `local-completions` sends for loglikelihood (echo, logprobs, max_tokens 0 or 1) and generation tasks."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int = Field(1, ge=1)
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        names += [name for name, value in (("best_of", self.best_of != 1), ("suffix", self.suffix is not None))
                  if value]
        if self.stream and (self.echo or self.logprobs is not None):
            names.append("echo or logprobs with stream")
        return names

    def prompts(self) -> list[str | list[int]]:
        """One prompt or several: text, or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


def tool_calls(calls: list[dict]) -> list[dict]:
    """Calls read from a reply as OpenAI's `tool_calls`: an id each, the arguments a JSON string."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            for call in calls]


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, scored: list[tuple[float, list[tuple[int, float]]]], ids: list[int]) -> dict:
    """Chat's `logprobs`: a {token, logprob, bytes, top_logprobs} entry per reply token."""

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(token_id, logprob), "top_logprobs": [entry(i, p) for i, p in top]}
                        for token_id, (logprob, top) in zip(ids, scored)], "refusal": None}


def completion_logprobs(tokenizer, ids: list[int], scored: list, first: int, top_n: int) -> dict:
    """The completions route's `logprobs` for ids[first:] (echo: from 0, where the first token has none):
    tokens, token_logprobs, top_logprobs (the top `top_n` and the token itself, as OpenAI gives), text_offset."""
    tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
    for position in range(first, len(ids)):
        text = token_text(tokenizer, ids[position])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if position == 0:
            token_logprobs.append(None)
            tops.append(None)
            continue
        logprob, top = scored[position - 1]
        token_logprobs.append(logprob)
        best = {token_text(tokenizer, i): p for i, p in top[:top_n]}
        best.setdefault(text, logprob)
        tops.append(best)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
