"""`sftlab serve`: an OpenAI-compatible server for a run (base + adapter) or a model folder, with a chat page.

The prompt is rendered by the project's one renderer and generation stops on the run's stop ids, so what was
trained is what is served. Routes: POST /v1/chat/completions (streaming or not; function calls in a reply come
back as tool_calls; logprobs), POST /v1/completions (raw text or token ids; echo and logprobs, for evaluation
harnesses' loglikelihood tasks), GET /v1/models, GET /health, GET / (the chat page). Every error is a 4xx in
OpenAI's error shape: body too large (413), bad JSON, fields, roles, lengths or a parameter this server does not
honour (400), a full queue (429, at once), a missing or wrong key (401). A line per request goes to the access
log. Binds 127.0.0.1 unless told. For production scale, serve a merged model with vLLM (docs/export-and-serve.md).
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from sftlab.config import Range, check_fields
from sftlab.errors import UserError
from sftlab.infer import routes
from sftlab.infer.engine import Engine
from sftlab.infer.http import KEEP_ALIVE_S, AccessLog, BodyLimit, guard, header_timeout_protocol
from sftlab.infer.routes import Limits, Served

LogLevel = Literal["debug", "info", "warning", "error"]


def create_app(model, tokenizer, name: str, api_key: str | None = None, limits: Limits | None = None,
               context: int | None = None, system_prompt: str | None = None,
               repetition_penalty: float | None = None) -> FastAPI:
    """`system_prompt`: put before conversations without a system message (the run's, as it was trained).
    `repetition_penalty`: applied to every request (None: none, as OpenAI's API)."""
    limits = limits or Limits()
    engine = Engine(model, tokenizer, limits.max_batch, limits.max_queue, repetition_penalty)
    app = FastAPI(title="sftlab serve", version="1", description=f"OpenAI-compatible completions for {name}.")
    app.state.engine = engine
    app.state.served = Served(engine, name, limits, context, system_prompt,
                              tokenizer.convert_ids_to_tokens(sorted(engine.stop_ids)))
    guard(app, api_key)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/", response_class=HTMLResponse)(routes.page)
    app.post("/v1/chat/completions")(routes.chat_completions)
    app.post("/v1/completions")(routes.completions)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(AccessLog)
    return app


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
    max_tokens: int | None = field(default=Limits().max_tokens, metadata={
        "help": "Cap on one reply's tokens (a request asking more gets a 400). Default: none but the model's "
                "context left after the prompt, which is also a reply's length when a request asks none."})
    max_queue: int = field(default=Limits().max_queue, metadata={"help": "Requests waiting or running; then 429."})
    max_batch: int = field(default=Limits().max_batch, metadata={"help": "Requests generated together."})
    max_body_bytes: int = field(default=Limits().max_body_bytes, metadata={"help": "Larger bodies get 413."})
    repetition_penalty: float | None = field(default=None, metadata={
        "help": "Applied to every request. Default: none, as OpenAI's API and vLLM (`sftlab chat` applies the "
                "tutorial's 1.2 when sampling)."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})
    log_level: LogLevel = field(default="info", metadata={
        "help": "info: a line per request (client, method, path, status, milliseconds, tokens) and startup; "
                "warning: only problems; debug: more."})

    RANGES: ClassVar[dict] = {**{name: Range(1, integer=True) for name in ("max_queue", "max_batch", "max_body_bytes")},
                              "port": Range(1, high=65535, integer=True),
                              "max_tokens": Range(1, integer=True, nullable=True),
                              "repetition_penalty": Range(0, above=True, nullable=True)}

    def __post_init__(self):
        check_fields(self)
        if not self.adapter and not self.model:
            raise ValueError("pass --adapter RUN (a training run) or --model PATH (a model folder)")
        self.api_key = self.api_key or os.environ.get("SFTLAB_API_KEY")


ARGUMENTS = (ServeArguments,)  # `sftlab serve`'s (cli.py parses them)


def check_listen(host: str, port: int) -> None:
    """The address can be listened on (bound, then released at once): uvicorn would say it after the model loaded,
    in its own log line, with exit code 3."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror} (another server there? choose another "
                            "--port)") from None


def run(args: ServeArguments) -> int:
    import uvicorn

    from sftlab.model.load import inference_paths, load_for_inference, model_context
    from sftlab.run_dir import recorded_system_prompt

    check_listen(args.host, args.port)  # a busy port or an unknown host: one line, before the model loads
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
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=args.log_level.upper())
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S,
                http=header_timeout_protocol())
    return 0
