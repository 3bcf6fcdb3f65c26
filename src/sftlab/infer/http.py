"""The HTTP layer under `sftlab serve`, which uvicorn and FastAPI leave to the application: OpenAI's error shape for
every failure, Bearer-key authorization, a request-body limit that still lets the client read its 413, and a
deadline for a request's headers."""

import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def guard(app: FastAPI, api_key: str | None) -> None:
    """Every route but /health and the chat page needs `Authorization: Bearer KEY` when a key is set (the page holds
    no data: it asks for the key and sends it with each API call, since a browser sends no header on navigation);
    every error, a validation failure or an unexpected exception alike, answers in OpenAI's error shape (never a
    bare 500 page)."""

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        open_route = request.url.path == "/health" or (request.url.path == "/" and request.method in ("GET", "HEAD"))
        if api_key and not open_route:
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
        if length is None:  # chunked: read it all (up to the limit) before the app parses any of it
            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunks.append(message.get("body", b""))
                seen += len(chunks[-1])
                more = message.get("more_body", False)
                if seen > self.max_bytes:
                    if more:
                        await drain(receive, DRAIN_BYTES - seen)
                    return await too_big(scope, receive, send)
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

            return await self.app(scope, replay, send)

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


access_log = logging.getLogger("sftlab.serve")


class AccessLog:
    """A line per request once its response is complete (a stream's too, at its end): client, method, path,
    status, milliseconds, and the tokens of a completion (its handler leaves `usage` in the request's state).
    uvicorn's own access log is off: it logs a stream when it starts, before its status can change or its
    tokens are known."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, logged = time.perf_counter(), [500], [False]

        def log() -> None:
            logged[0] = True
            usage = scope.get("state", {}).get("usage")
            tokens = " prompt_tokens={prompt_tokens} completion_tokens={completion_tokens}".format(**usage()) \
                if usage else ""
            client = scope.get("client") or ("-", 0)
            access_log.info('%s "%s %s" %d %.0f ms%s', client[0], scope["method"], scope["path"], status[0],
                            (time.perf_counter() - started) * 1000, tokens)

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                log()

        try:
            await self.app(scope, receive, logged_send)
        finally:
            if not logged[0]:  # the client left mid-response
                status[0] = 499 if status[0] < 400 else status[0]
                log()
