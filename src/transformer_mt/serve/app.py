"""The HTTP face of a server: routes, JSON errors, and the batcher's start and stop.

    GET  /            the translation page (static files shipped in this package)
    GET  /health      {"status": "ok"}
    GET  /info        languages, vocabulary, model size, decoding defaults, checkpoint, bounds
    GET  /metrics     Prometheus text: requests, sentences, errors, queue depth, latency
    POST /translate   {"text": str | [str], "beam_size"?, "length_penalty"?, "nbest"?}
    POST /attention   {"text": str, "words"?: bool}: all attention weights of one sentence

Every refusal is `{"error": "..."}` with its status (400, 404, 405, 413, 422, 503); a bug is a 500
with the same shape, logged with its traceback, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from transformer_mt.errors import ConfigError
from transformer_mt.serve.batcher import Batcher, QueueFullError
from transformer_mt.serve.engine import Engine, Scored
from transformer_mt.serve.metrics import ServerMetrics
from transformer_mt.serve.requests import RequestError, parse_attention, parse_translate
from transformer_mt.serve.settings import ServeSettings

STATIC = Path(__file__).parent / "static"
DRAIN_BYTES = 1 << 20  # most bytes of an over-long body read (and dropped) before its 413

Handler = Callable[[Request], Awaitable[Response]]


class Server:
    """What the routes share: the engine, the settings, the metrics and the batcher."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics()
        self.batcher = Batcher(engine.decode, engine.model_thread, settings, self.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # uvicorn calls the shutdown half after it has drained the requests in flight.
        self.batcher.start()
        try:
            yield
        finally:
            await self.batcher.stop()
            self.engine.close()

    def counted(self, route: str, handler: Handler) -> Handler:
        """`handler`, its answers (and refusals) counted under `route`."""

        async def wrapper(request: Request) -> Response:
            try:
                response = await handler(request)
            except RequestError as err:
                response = error(err.status, str(err))
            except Exception:
                self.metrics.responses[route, 500] += 1  # answered by `server_error`
                raise
            self.metrics.responses[route, response.status_code] += 1
            return response

        return wrapper

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        s = self.settings
        return JSONResponse(
            {
                **self.engine.info(),
                "bounds": {
                    "max_body_bytes": s.max_body_bytes,
                    "max_sentences": s.max_sentences,
                    "max_chars": s.max_chars,
                    "max_queue": s.max_queue,
                    "timeout_s": s.timeout_s,
                    "attention_max_tokens": s.attention_max_tokens,
                },
                "batching": {
                    "enabled": s.batching,
                    "batch_wait_ms": s.batch_wait_ms,
                    "batch_tokens": s.batch_tokens,
                    **self.metrics.batching(),
                },
            }
        )

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(
            self.metrics.render(self.batcher.depth),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def translate(self, request: Request) -> Response:
        started = time.monotonic()
        self.metrics.in_flight += 1
        try:
            # One clock for the whole request: reading, tokenizing, queueing and decoding.
            async with asyncio.timeout(self.settings.timeout_s):
                return await self.translated(request)
        except QueueFullError:
            return error(503, "the server is busy: too many requests waiting; retry later", 1)
        except TimeoutError:
            return self.too_late()
        finally:
            self.metrics.in_flight -= 1
            self.metrics.latency.observe(time.monotonic() - started)

    async def translated(self, request: Request) -> Response:
        body = await read_body(request, self.settings.max_body_bytes)
        req = parse_translate(body, self.settings, self.engine.defaults)
        loop = asyncio.get_running_loop()
        sources = await loop.run_in_executor(self.engine.text_thread, self.engine.encode, req.lines)
        results = await self.batcher.submit(sources, req.decode_cfg)
        self.metrics.sentences += len(req.lines)
        return JSONResponse(translations(results, req.decode_cfg.nbest))

    async def attention(self, request: Request) -> Response:
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                return await self.attended(request)
        except TimeoutError:
            return self.too_late()

    async def attended(self, request: Request) -> Response:
        body = await read_body(request, self.settings.max_body_bytes)
        text, words = parse_attention(body, self.settings)
        loop = asyncio.get_running_loop()
        (ids,) = await loop.run_in_executor(self.engine.text_thread, self.engine.encode, [text])
        limit = self.settings.attention_max_tokens
        if len(ids) > limit:
            raise RequestError(
                413, f"the sentence has {len(ids)} tokens; attention is shown for at most {limit}"
            )
        try:
            maps = await loop.run_in_executor(
                self.engine.model_thread, self.engine.attention, ids, words
            )
        except ConfigError as err:  # an RNN checkpoint
            raise RequestError(422, str(err)) from None
        return JSONResponse(maps)

    def too_late(self) -> Response:
        return error(503, f"no answer within {self.settings.timeout_s:g} s; retry later", 1)

    def app(self) -> Starlette:
        routes = [
            Route("/", self.counted("/", self.page)),
            Route("/health", self.counted("/health", self.health)),
            Route("/info", self.counted("/info", self.info)),
            Route("/metrics", self.counted("/metrics", self.prometheus)),
            Route("/translate", self.counted("/translate", self.translate), methods=["POST"]),
            Route("/attention", self.counted("/attention", self.attention), methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        return Starlette(
            routes=routes,
            lifespan=self.lifespan,
            exception_handlers={HTTPException: http_error, Exception: server_error},
        )


def translations(results: list[Scored], nbest: int) -> dict[str, Any]:
    """The answer: one entry per sentence; with nbest > 1 each entry is its n-best list."""
    if nbest == 1:
        return {
            "translations": [hyps[0][0] for hyps in results],
            "scores": [hyps[0][1] for hyps in results],
        }
    return {
        "translations": [[text for text, _ in hyps] for hyps in results],
        "scores": [[score for _, score in hyps] for hyps in results],
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 when it has more than `limit` bytes.

    The rest of an over-long body is read and dropped (up to `DRAIN_BYTES`) before the answer:
    a client that sends its whole body before reading would otherwise meet a reset connection
    instead of the 413.
    """
    declared = request.headers.get("content-length", "")
    too_long = f"the body has more than {limit} bytes, the most accepted"
    if declared.isdigit() and int(declared) > max(limit, DRAIN_BYTES):
        raise RequestError(413, too_long)
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > DRAIN_BYTES:
            break
    if size > limit:
        raise RequestError(413, too_long)
    return bytes(body)


def error(status: int, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


async def server_error(request: Request, exc: Exception) -> Response:
    # Starlette raises the exception again once this answer is sent: uvicorn logs its traceback.
    return error(500, f"internal error ({type(exc).__name__}); the server goes on")
