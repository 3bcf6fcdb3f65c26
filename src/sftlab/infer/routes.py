"""`sftlab serve`'s routes: a request becomes engine jobs (rendered by the one renderer, checked against the
limits), the jobs become OpenAI's responses, whole or streamed. serve.py builds the app that holds them."""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from sftlab.chat_format import MessageError
from sftlab.chat_tools import content_text, validate_messages
from sftlab.data.convert import FieldError, openai_to_messages
from sftlab.data.load import unusable
from sftlab.infer.engine import Engine, Job, QueueFull
from sftlab.infer.http import error
from sftlab.infer.openai_api import (
    ChatRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    tool_calls,
)
from sftlab.model.load import with_system_prompt

STREAM_INTERVAL_S = 0.02  # at most one chunk per stream per 20 ms (the first one at once)


class Limits(BaseModel):
    max_body_bytes: int = 1_000_000
    max_tokens: int | None = None  # the cap on one reply; None: the model's context left after the prompt
    max_queue: int = 64  # requests waiting or running; beyond it 429
    max_batch: int = 8


@dataclass(frozen=True)
class Served:
    """What the routes serve, held by the app (app.state.served)."""
    engine: Engine
    name: str
    limits: Limits
    context: int | None  # the model's context length
    system_prompt: str | None  # put before conversations without one (the run's, as it was trained)
    stop_tokens: list[str]


async def health(request: Request):
    served = request.app.state.served
    return {"status": "ok", "model": served.name, "load": served.engine.load, **served.engine.stats}


async def models(request: Request):
    served = request.app.state.served
    return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "sftlab",
                                        "max_model_len": served.context, "stop_tokens": served.stop_tokens}]}


async def page():
    return resources.files("sftlab.infer").joinpath("chat_page.html").read_text(encoding="utf-8")


async def chat_completions(request: Request, body: ChatRequest):
    served = request.app.state.served
    engine = served.engine
    job = new_job(body, engine, served.limits, served.context, served.system_prompt)
    if isinstance(job, JSONResponse):
        return job
    try:
        engine.submit(job)
    except QueueFull as exc:
        return busy(exc)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    request.state.usage = usage = lambda: usage_of([job])  # noqa: E731 (the access log reads it too)
    reader = Calls(engine, body)
    if body.stream:
        return StreamingResponse(stream(job, engine, completion_id, created, served.name, usage, reader),
                                 media_type="text/event-stream")
    if not await finished(job, engine, request):
        return error(400, "client disconnected")
    message, finish = reader.message(job)
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    if body.logprobs:
        reply = reply_ids(job, engine)
        scored = await asyncio.to_thread(engine.logprobs, job.prompt + reply, body.top_logprobs or 0)
        choice["logprobs"] = chat_logprobs(engine.tokenizer, scored[len(job.prompt) - 1:], reply)
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": served.name,
            "choices": [choice], "usage": usage()}


async def completions(request: Request, body: CompletionRequest):
    served = request.app.state.served
    engine = served.engine
    jobs = completion_jobs(body, engine, served.limits, served.context)
    if isinstance(jobs, JSONResponse):
        return jobs
    for job in jobs:
        try:
            if not job.done:  # max_tokens 0 is done at once: nothing to generate
                engine.submit(job)
        except QueueFull as exc:
            for other in jobs:
                engine.release(other)
            return busy(exc)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    request.state.usage = usage = lambda: usage_of(jobs)  # noqa: E731
    if body.stream:
        return StreamingResponse(stream(jobs[0], engine, completion_id, created, served.name, usage),
                                 media_type="text/event-stream")
    for job in jobs:
        if not await finished(job, engine, request):
            for other in jobs:
                engine.release(other)
            return error(400, "client disconnected")
    choices = [await completion_choice(n, job, body, engine) for n, job in enumerate(jobs)]
    return {"id": completion_id, "object": "text_completion", "created": created, "model": served.name,
            "choices": choices, "usage": usage()}


def text_of(content, i: int) -> str:
    text = "" if content is None else content_text(content)
    if text is None:
        raise MessageError(f"messages[{i}].content: only text parts are supported")
    return text


def conversation(request: ChatRequest) -> tuple[list[dict], list | None]:
    """The request's (messages, tools), their arguments parsed, checked like chat's."""
    raw = []
    for i, message in enumerate(request.messages):
        item = message.model_dump(exclude_none=True)
        item["content"] = text_of(message.content, i)
        if item["role"] == "developer":  # OpenAI's newer name for the system message
            item["role"] = "system"
        raw.append(item)
    for i, tool in enumerate(request.tools or []):
        if "function" in tool and not isinstance(tool["function"], dict):
            raise MessageError(f"tools[{i}].function: expected an object (name, description, parameters)")
    problem = unusable({"messages": raw, "tools": request.tools})  # a lone surrogate cannot be tokenized
    if problem:
        raise MessageError(problem[1])
    try:
        messages, tools = openai_to_messages({"messages": raw, "tools": request.tools})
    except FieldError as exc:
        raise MessageError(str(exc)) from exc
    validate_messages(messages, for_training=False)
    if messages[-1]["role"] == "assistant":
        raise MessageError(f"messages[{len(messages) - 1}].role: the last message must be the user's or a tool "
                           "result, not the assistant's")
    return messages, tools


def busy(exc: QueueFull) -> JSONResponse:
    return error(429, f"server busy: {exc}; retry later", kind="rate_limit_error", code="queue_full")


def usage_of(jobs: list[Job]) -> dict:
    prompt, completion = sum(len(j.prompt) for j in jobs), sum(len(j.tokens) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def reply_ids(job: Job, engine: Engine) -> list[int]:
    """The tokens of a reply, without the stop token that ended it."""
    return job.tokens[:-1] if job.tokens and job.tokens[-1] in engine.stop_ids else list(job.tokens)


class Calls:
    """Reads function calls back from a reply (when the request gave tools and the template writes calls the
    renderer can learn: ChatRenderer.call_format) as OpenAI's tool_calls, with finish_reason "tool_calls"."""

    def __init__(self, engine: Engine, body: ChatRequest):
        self.format = engine.renderer.call_format if body.wants_calls else None
        self.names = {(t.get("function") or {}).get("name") for t in body.tools or []}

    def found(self, job: Job) -> tuple[str, list[dict]] | None:
        if self.format is None or job.finish_reason != "stop":
            return None
        return self.format.calls_in(job.text, self.names)

    def message(self, job: Job) -> tuple[dict, str]:
        found = self.found(job)
        if found is None:
            return {"role": "assistant", "content": job.text}, job.finish_reason
        return {"role": "assistant", "content": found[0] or None, "tool_calls": tool_calls(found[1])}, "tool_calls"

    def streamable(self, job: Job, text: str) -> str:
        """What of the reply so far can go out as content: held back while it may be the start of a call."""
        return text if self.format is None or job.done else text[:self.format.may_become_call(text, self.names)]


def checked(body) -> JSONResponse | None:
    """The 400 for what both routes check alike: parameters not honoured here, stop strings."""
    unsupported = body.unsupported()
    if unsupported:
        return error(400, f"not supported by this server: {', '.join(unsupported)}",
                     param=unsupported[0].split(" (")[0], code="unsupported_parameter")
    stop = body.stop_strings()
    if len(stop) > 4 or any(not s for s in stop):
        return error(400, "stop: up to 4 non-empty strings", param="stop")
    return None


def reply_budget(prompt: list[int], asked: int | None, limits: Limits, context: int | None) -> int | JSONResponse:
    """The most tokens a reply may have: what was asked, within the server's cap and the context left after
    the prompt (the whole of it when nothing was asked and no cap is set, as vLLM does)."""
    if asked is not None and limits.max_tokens is not None and asked > limits.max_tokens:
        return error(400, f"max_tokens: {asked} is over this server's cap of {limits.max_tokens}", param="max_tokens")
    room = context - len(prompt) if context else limits.max_tokens
    if room is None:
        room = asked if asked is not None else 1024  # neither a context nor a cap known: sftlab's former cap
    if (room < 1 and asked != 0) or (asked is not None and asked > room):
        return error(400, f"the prompt is {len(prompt)} tokens; with max_tokens {max(asked or 1, 1)} it exceeds the "
                          f"model's context of {context} tokens", param="messages", code="context_length_exceeded")
    return min(x for x in (asked, room, limits.max_tokens) if x is not None)


def new_job(body: ChatRequest, engine: Engine, limits: Limits, context: int | None, system_prompt: str | None
            ) -> Job | JSONResponse:
    """The request as a generation job, or the 400 that says what is wrong with it."""
    problem = checked(body)
    if problem is not None:
        return problem
    try:  # rendering too: a template that renders no tools refuses a request with them (a 400, not a 500)
        messages, tools = conversation(body)
        prompt = engine.renderer.prompt_ids(with_system_prompt(messages, system_prompt), tools)
    except MessageError as exc:
        return error(400, str(exc), param="messages")
    budget = reply_budget(prompt, body.max_tokens or body.max_completion_tokens, limits, context)
    if isinstance(budget, JSONResponse):
        return budget
    return Job(prompt, budget, body.temperature, body.top_p, body.seed, body.stop_strings(),
               stream=body.stream, loop=asyncio.get_running_loop(), updates=asyncio.Event())


def completion_jobs(body: CompletionRequest, engine: Engine, limits: Limits, context: int | None
                    ) -> list[Job] | JSONResponse:
    """A job per prompt (text is tokenized as the model's tokenizer does with its special tokens, ids are taken
    as they are), or the 400 that says what is wrong."""
    problem = checked(body)
    if problem is not None:
        return problem
    prompts = body.prompts()
    if not prompts:
        return error(400, "prompt: an empty list (give one prompt or more)", param="prompt")
    if len(prompts) > limits.max_queue:  # a request that could never be queued whole: not a busy server's 429
        return error(400, f"prompt: {len(prompts)} prompts in one request is over this server's cap of "
                          f"{limits.max_queue} (its --max_queue)", param="prompt")
    if body.stream and len(prompts) != 1:
        return error(400, "stream: one prompt at a time", param="prompt")
    jobs, vocabulary = [], len(engine.tokenizer)
    for n, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids or any(not isinstance(i, int) or not 0 <= i < vocabulary for i in ids):
            return error(400, f"prompt[{n}]: empty, or a token id outside 0..{vocabulary - 1}", param="prompt")
        budget = reply_budget(ids, body.max_tokens, limits, context)
        if isinstance(budget, JSONResponse):
            return budget
        jobs.append(Job(ids, budget, body.temperature, body.top_p, body.seed, body.stop_strings(), plain=True,
                        finish_reason=None if budget else "length", stream=body.stream,
                        loop=asyncio.get_running_loop(), updates=asyncio.Event()))
    return jobs


async def completion_choice(index: int, job: Job, body: CompletionRequest, engine: Engine) -> dict:
    """One choice of a completion: the text (after the prompt's with echo) and, when asked, the logprobs of
    every token (the prompt's too with echo; the token that stopped generation included, as vLLM does)."""
    prompt_text = engine.tokenizer.decode(job.prompt) if body.echo else ""
    choice = {"index": index, "text": prompt_text + job.text, "logprobs": None, "finish_reason": job.finish_reason}
    if body.logprobs is not None:
        ids = job.prompt + job.tokens
        scored = await asyncio.to_thread(engine.logprobs, ids, body.logprobs) if len(ids) > 1 else []
        choice["logprobs"] = completion_logprobs(engine.tokenizer, ids, scored, 0 if body.echo else len(job.prompt),
                                                 body.logprobs)
    return choice


async def finished(job: Job, engine: Engine, request: Request) -> bool:
    """Waits for a job; False if its client went away first. Either way the job is released: one not done is
    cancelled, which frees its row and its slot."""
    try:
        while not job.done:
            try:
                await asyncio.wait_for(job.wait(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return False
    finally:
        engine.release(job)
    return True


async def stream(job: Job, engine: Engine, completion_id: str, created: int, name: str, usage,
                 calls: Calls | None = None):
    """OpenAI's chunks as server-sent events, ending with data: [DONE]; a client that leaves cancels its job.
    A chat stream (`calls` given) sends deltas; a completion stream sends text. A chat reply that may become a
    function call is held back until it is decided; a call goes out as a tool_calls delta."""

    def chunk(delta: dict | None, finish: str | None = None, with_usage: bool = False) -> str:
        if calls is None:
            body = {"id": completion_id, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": (delta or {}).get("content", ""), "logprobs": None,
                                 "finish_reason": finish}]}
        else:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]}
        if with_usage:
            body["usage"] = usage()
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if calls is not None:
            yield chunk({"role": "assistant", "content": ""})
        while True:
            if not job.done:
                await job.wait()
            text = job.ready_text() if calls is None else calls.streamable(job, job.ready_text())
            found = calls.found(job) if calls is not None and job.done else None
            if found is not None:
                text = found[0]
            if len(text) > job.sent:
                yield chunk({"content": text[job.sent:]})
                job.sent = len(text)
            if job.done:
                break
            # gather the next tokens into one chunk: a chunk per token costs more than generating it
            await asyncio.sleep(STREAM_INTERVAL_S)
        if found is not None:
            deltas = [{"index": n, **call} for n, call in enumerate(tool_calls(found[1]))]
            yield chunk({"tool_calls": deltas})
        yield chunk(None, "tool_calls" if found is not None else job.finish_reason, with_usage=True)
        yield "data: [DONE]\n\n"
    finally:
        engine.release(job)  # the client went away mid-stream: the job is cancelled, its row freed
