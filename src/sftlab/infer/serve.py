"""`sftlab serve`: an OpenAI-compatible server for a run (base + adapter) or a model folder, with a chat page.

The prompt is rendered by the project's one renderer and generation stops on the run's stop ids, so what was
trained is what is served. Routes: POST /v1/chat/completions (streaming or not), GET /v1/models, GET /health,
GET / (the chat page). Every error is a 4xx in OpenAI's error shape: body too large (413), bad JSON, fields,
roles or lengths (400), a full queue (429, at once), a missing or wrong key (401). Binds 127.0.0.1 unless told.
For production scale, serve a merged model with vLLM (README: Export and serve).
"""

import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import ClassVar, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from sftlab.chat_format import MessageError, validate_messages
from sftlab.chat_tools import content_text
from sftlab.config import Range, check_fields
from sftlab.data.convert import FieldError, openai_to_messages
from sftlab.data.load import unusable
from sftlab.infer.engine import Engine, Job, QueueFull
from sftlab.infer.generate import SamplingArgs
from sftlab.infer.http import KEEP_ALIVE_S, BodyLimit, error, guard, header_timeout_protocol
from sftlab.model.load import with_system_prompt

DEFAULTS = SamplingArgs()
STREAM_INTERVAL_S = 0.02  # at most one chunk per stream per 20 ms (the first one at once)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat completion request; fields sftlab does not use are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    temperature: float = Field(DEFAULTS.temperature, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(DEFAULTS.top_p, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    tools: list[dict] | None = None


class Limits(BaseModel):
    max_body_bytes: int = 1_000_000
    max_tokens: int = 1024  # the cap on one reply
    max_queue: int = 64  # requests waiting or running; beyond it 429
    max_batch: int = 8


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


def create_app(model, tokenizer, name: str, api_key: str | None = None, limits: Limits | None = None,
               context: int | None = None, system_prompt: str | None = None,
               repetition_penalty: float | None = None) -> FastAPI:
    """`system_prompt`: put before conversations without a system message (the run's, as it was trained).
    `repetition_penalty`: applied to every request (None: none, as OpenAI's API)."""
    limits = limits or Limits()
    engine = Engine(model, tokenizer, limits.max_batch, limits.max_queue, repetition_penalty)
    app = FastAPI(title="sftlab serve", version="1", description=f"OpenAI-compatible chat completions for {name}.")
    app.state.engine = engine
    guard(app, api_key)
    stop_tokens = tokenizer.convert_ids_to_tokens(sorted(engine.stop_ids))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "load": engine.load, **engine.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sftlab",
                                            "stop_tokens": stop_tokens}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("sftlab.infer").joinpath("chat_page.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        job = new_job(body, engine, limits, context, system_prompt)
        if isinstance(job, JSONResponse):
            return job
        try:
            engine.submit(job)
        except QueueFull as exc:
            return error(429, f"server busy: {exc}; retry later", kind="rate_limit_error", code="queue_full")
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda: {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens),  # noqa: E731
                         "total_tokens": len(job.prompt) + len(job.tokens)}
        if body.stream:
            return StreamingResponse(stream(job, engine, completion_id, created, name, usage),
                                     media_type="text/event-stream")
        if not await finished(job, engine, request):
            return error(400, "client disconnected")
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                             "finish_reason": job.finish_reason}], "usage": usage()}

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app


def new_job(body: ChatRequest, engine: Engine, limits: Limits, context: int | None, system_prompt: str | None
            ) -> Job | JSONResponse:
    """The request as a generation job, or the 400 that says what is wrong with it."""
    if body.n != 1:
        return error(400, "n: only n=1 is supported", param="n")
    try:  # rendering too: a template that renders no tools refuses a request with them (a 400, not a 500)
        messages, tools = conversation(body)
        prompt = engine.renderer.prompt_ids(with_system_prompt(messages, system_prompt), tools)
    except MessageError as exc:
        return error(400, str(exc), param="messages")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        return error(400, "stop: up to 4 non-empty strings", param="stop")
    asked = body.max_tokens or body.max_completion_tokens
    if asked is not None and asked > limits.max_tokens:
        return error(400, f"max_tokens: {asked} is over this server's cap of {limits.max_tokens}", param="max_tokens")
    room = (context - len(prompt)) if context else limits.max_tokens
    if room < 1 or (asked is not None and asked > room):
        return error(400, f"the prompt is {len(prompt)} tokens; with max_tokens {asked or 1} it exceeds the "
                          f"model's context of {context} tokens", param="messages", code="context_length_exceeded")
    return Job(prompt, min(asked or limits.max_tokens, room), body.temperature, body.top_p, body.seed, stop,
               stream=body.stream, loop=asyncio.get_running_loop(), updates=asyncio.Event())


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


async def stream(job: Job, engine: Engine, completion_id: str, created: int, name: str, usage):
    """OpenAI's chunks as server-sent events, ending with data: [DONE]; a client that leaves cancels its job."""

    def chunk(delta: dict, finish: str | None = None, with_usage: bool = False) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if with_usage:
            body["usage"] = usage()
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            if not job.done:
                await job.wait()
            text = job.ready_text()
            if len(text) > job.sent:
                yield chunk({"content": text[job.sent:]})
                job.sent = len(text)
            if job.done:
                break
            # gather the next tokens into one chunk: a chunk per token costs more than generating it
            await asyncio.sleep(STREAM_INTERVAL_S)
        yield chunk({}, job.finish_reason, with_usage=True)
        yield "data: [DONE]\n\n"
    finally:
        engine.release(job)  # the client went away mid-stream: the job is cancelled, its row freed


@dataclass
class ServeArguments:
    adapter: str | None = field(default=None, metadata={
        "help": "A run folder (LoRA adapter; its base is read from it)."})
    model: str | None = field(default=None, metadata={
        "help": "A model folder (merged or full), or the base for --adapter."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (default: this machine only)."})
    port: int = field(default=8000, metadata={"help": "Port to bind."})
    api_key: str | None = field(default=None, metadata={
        "help": "Require Authorization: Bearer KEY on every route but /health (default: env SFTLAB_API_KEY)."})
    name: str | None = field(default=None, metadata={
        "help": "The model name clients see (default: the folder's name)."})
    max_tokens: int = field(default=Limits().max_tokens, metadata={"help": "Cap on one reply's tokens."})
    max_queue: int = field(default=Limits().max_queue, metadata={"help": "Requests waiting or running; then 429."})
    max_batch: int = field(default=Limits().max_batch, metadata={"help": "Requests generated together."})
    max_body_bytes: int = field(default=Limits().max_body_bytes, metadata={"help": "Larger bodies get 413."})
    repetition_penalty: float | None = field(default=None, metadata={
        "help": "Applied to every request. Default: none, as OpenAI's API and vLLM (`sftlab chat` applies the "
                "tutorial's 1.2 when sampling)."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})

    RANGES: ClassVar[dict] = {**{name: Range(1, integer=True) for name in ("port", "max_tokens", "max_queue",
                                                                          "max_batch", "max_body_bytes")},
                              "repetition_penalty": Range(0, above=True, nullable=True)}

    def __post_init__(self):
        check_fields(self)
        if not self.adapter and not self.model:
            raise ValueError("pass --adapter RUN (a training run) or --model PATH (a model folder)")
        self.api_key = self.api_key or os.environ.get("SFTLAB_API_KEY")


ARGUMENTS = (ServeArguments,)  # `sftlab serve`'s (cli.py parses them)


def run(args: ServeArguments) -> int:
    import uvicorn

    from sftlab.model.load import inference_paths, load_for_inference, model_context, recorded_system_prompt

    base_path, _ = inference_paths(args.model, args.adapter)
    context = model_context(base_path)
    model, tokenizer = load_for_inference(args.model, args.adapter, args.device)
    name = args.name or os.path.basename(os.path.normpath(args.adapter or args.model))
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens, max_queue=args.max_queue,
                    max_batch=args.max_batch)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: binding {args.host} without an API key: anyone who can reach this port can use the model "
              "(set --api_key or SFTLAB_API_KEY)", file=sys.stderr)
    app = create_app(model, tokenizer, name, args.api_key, limits, context,
                     recorded_system_prompt(args.adapter or args.model), args.repetition_penalty)
    print(f"serving {name} on http://{args.host}:{args.port} (chat page: /, API: /v1/chat/completions)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S,
                http=header_timeout_protocol())
    return 0
