"""`sftlab serve`: an OpenAI-compatible server for a run (base + adapter) or a model folder, with a chat page.

The prompt is rendered by the project's one renderer and generation stops on the run's stop ids, so what was
trained is what is served. Routes: POST /v1/chat/completions (streaming or not), GET /v1/models, GET /health,
GET / (the chat page). Every error is a 4xx in OpenAI's error shape: body too large (413), bad JSON, fields,
roles or lengths (400), a full queue (429, at once), a missing or wrong key (401). Binds 127.0.0.1 unless told.
For production scale, serve a merged model with vLLM (README: Export and serve).
"""

import argparse
import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from sftlab.chat_format import MessageError, content_text, validate_messages
from sftlab.data.convert import FieldError, openai_to_messages
from sftlab.data.load import unusable
from sftlab.errors import UserError
from sftlab.infer.engine import Engine, Job, QueueFull
from sftlab.infer.generate import SamplingArgs
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


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this many seconds
HEADER_TIMEOUT_S = 10  # a request's headers must arrive within this many seconds of its first byte (or connect)
DRAIN_BYTES = 64 * 2**20  # a body over the limit is read and discarded up to this, so its client reads the 413


class BodyLimit:
    """Refuses a request body over the limit (413) by its Content-Length or while it is read. The rest of the body
    is read and dropped first: a client still sending a 20 MB body would otherwise get a broken pipe instead of
    the 413 (urllib, requests and the openai client read the response only once they have sent it all)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = error(413, f"request body over {self.max_bytes} bytes", code="body_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            if length.isdigit() and int(length) <= DRAIN_BYTES:
                await drain(receive)
            return await too_big(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                if message.get("more_body"):
                    await drain(receive, DRAIN_BYTES - seen)
                raise StarletteHTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def header_timeout_protocol():
    """uvicorn's h11 protocol with a deadline for each request's headers, which uvicorn lacks: a client that
    connects and sends nothing, or sends its headers a byte at a time, would hold a connection (and a file
    descriptor) for as long as it likes. Past HEADER_TIMEOUT_S the connection is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:  # between requests: the next one's headers
                self._arm()
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # its headers are in
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.deadline is None:
                self.deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._too_slow)

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _too_slow(self) -> None:
            self.deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeout


async def drain(receive, budget: int = DRAIN_BYTES) -> None:
    """Reads and drops the rest of a request body, up to `budget` bytes."""
    while budget > 0:
        message = await receive()
        budget -= len(message.get("body", b""))
        if message.get("type") != "http.request" or not message.get("more_body"):
            return


def text_of(content, i: int) -> str:
    text = "" if content is None else content_text(content)
    if text is None:
        raise MessageError(f"messages[{i}].content: only text parts are supported")
    return text


def conversation(request: ChatRequest) -> list[dict]:
    """OpenAI messages -> sftlab's messages (tool calls and results included), checked like chat's."""
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
        messages = openai_to_messages({"messages": raw, "tools": request.tools} if request.tools else {"messages": raw})
    except FieldError as exc:
        raise MessageError(str(exc)) from exc
    validate_messages(messages, for_training=False)
    if messages[-1]["role"] == "assistant":
        raise MessageError(f"messages[{len(messages) - 1}].role: the last message must be the user's or a tool "
                           "result, not the assistant's")
    return messages


def create_app(model, tokenizer, name: str, api_key: str | None = None, limits: Limits | None = None,
               context: int | None = None, system_prompt: str | None = None) -> FastAPI:
    """`system_prompt`: put before conversations without a system message (the run's, as it was trained)."""
    limits = limits or Limits()
    engine = Engine(model, tokenizer, limits.max_batch, limits.max_queue)
    app = FastAPI(title="sftlab serve", version="1", description=f"OpenAI-compatible chat completions for {name}.")
    app.state.engine = engine
    stop_tokens = tokenizer.convert_ids_to_tokens(sorted(engine.stop_ids))

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key and request.url.path != "/health":
            scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
            # the scheme is case-insensitive (RFC 9110 section 11.1): bearer, Bearer and BEARER alike
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return error(401, "missing or wrong API key: send Authorization: Bearer KEY",
                             kind="authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), kind="invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # never a bare 500 page: still OpenAI's shape
        return error(500, f"internal error: {type(exc).__name__}", kind="server_error")

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
        if body.n != 1:
            return error(400, "n: only n=1 is supported", param="n")
        try:  # rendering too: a template that renders no tools refuses a request with them (a 400, not a 500)
            prompt = engine.renderer.prompt_ids(with_system_prompt(conversation(body), system_prompt))
        except MessageError as exc:
            return error(400, str(exc), param="messages")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            return error(400, "stop: up to 4 non-empty strings", param="stop")
        asked = body.max_tokens or body.max_completion_tokens
        if asked is not None and asked > limits.max_tokens:
            return error(400, f"max_tokens: {asked} is over this server's cap of {limits.max_tokens}",
                         param="max_tokens")
        room = (context - len(prompt)) if context else limits.max_tokens
        if room < 1 or (asked is not None and asked > room):
            return error(400, f"the prompt is {len(prompt)} tokens; with max_tokens {asked or 1} it exceeds the "
                              f"model's context of {context} tokens", param="messages", code="context_length_exceeded")
        job = Job(prompt, min(asked or limits.max_tokens, room), body.temperature, body.top_p, body.seed, stop,
                  stream=body.stream, loop=asyncio.get_running_loop(), updates=asyncio.Event())
        try:
            engine.submit(job)
        except QueueFull as exc:
            return error(429, f"server busy: {exc}; retry later", kind="rate_limit_error", code="queue_full")
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": len(job.tokens),  # noqa: E731
                         "total_tokens": len(prompt) + len(job.tokens)}
        if body.stream:
            return StreamingResponse(stream(job, engine, completion_id, created, name, usage),
                                     media_type="text/event-stream")
        try:
            while not job.done:
                try:
                    await asyncio.wait_for(job.wait(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return error(400, "client disconnected")
        finally:
            engine.release(job)  # a job not done is cancelled: it frees its row and its slot
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                             "finish_reason": job.finish_reason}], "usage": usage()}

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftlab serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", help="A run folder (LoRA adapter; its base is read from it).")
    p.add_argument("--model", help="A model folder (merged or full), or the base for --adapter.")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: this machine only).")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", dest="api_key", default=os.environ.get("SFTLAB_API_KEY"),
                   help="Require Authorization: Bearer KEY on every route but /health (or env SFTLAB_API_KEY).")
    p.add_argument("--name", help="The model name clients see (default: the folder's name).")
    p.add_argument("--max_tokens", type=int, default=Limits().max_tokens, help="Cap on one reply's tokens.")
    p.add_argument("--max_queue", type=int, default=Limits().max_queue, help="Requests waiting or running; then 429.")
    p.add_argument("--max_batch", type=int, default=Limits().max_batch, help="Requests generated together.")
    p.add_argument("--max_body_bytes", type=int, default=Limits().max_body_bytes, help="Larger bodies get 413.")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available).")
    return p


def main(argv: list[str]) -> int:
    import uvicorn
    from transformers import AutoConfig

    from sftlab.model.load import inference_paths, load_for_inference, recorded_system_prompt

    args = build_parser().parse_args(argv)
    if not args.adapter and not args.model:
        raise UserError("pass --adapter RUN (a training run) or --model PATH (a model folder)")
    for flag in ("max_tokens", "max_queue", "max_batch", "max_body_bytes", "port"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    base_path, _ = inference_paths(args.model, args.adapter)
    context = getattr(AutoConfig.from_pretrained(base_path).get_text_config(), "max_position_embeddings", None)
    model, tokenizer = load_for_inference(args.model, args.adapter, args.device)
    name = args.name or os.path.basename(os.path.normpath(args.adapter or args.model))
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens, max_queue=args.max_queue,
                    max_batch=args.max_batch)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: binding {args.host} without an API key: anyone who can reach this port can use the model "
              "(set --api-key or SFTLAB_API_KEY)", file=sys.stderr)
    app = create_app(model, tokenizer, name, args.api_key, limits, context,
                     recorded_system_prompt(args.adapter or args.model))
    print(f"serving {name} on http://{args.host}:{args.port} (chat page: /, API: /v1/chat/completions)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S,
                http=header_timeout_protocol())
    return 0
