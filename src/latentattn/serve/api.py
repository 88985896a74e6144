"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream` as server-sent events that
end in `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).

Every error is OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: malformed JSON or
wrong types 400, a prompt that does not fit the model's context (or the whole cache) 400, a body over
`max_body_bytes` 413, a full queue 429 with Retry-After, shutting down 503, anything unexpected 500 —
never a traceback. The engine runs in its own thread; each request's outputs cross to the event loop
through `loop.call_soon_threadsafe` into an asyncio.Queue. A client that disconnects cancels its
requests, whose blocks are freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from latentattn.serve.chat import chat_prompt
from latentattn.serve.engine import Engine, QueueFull, RequestRejected, ShuttingDown
from latentattn.serve.request import Output
from latentattn.serve.sampling import SamplingParams
from latentattn.tokens import SpecialTokens, encode_prompt

MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.25


class APIError(Exception):
    """An error answered as `{"error": {...}}` with `status`."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class _Request(BaseModel):
    """Fields both endpoints share (OpenAI's, plus vLLM's `top_k`); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


@dataclass(frozen=True)
class ServedModel:
    """What the API needs besides the engine: the model's name, tokenizer and special tokens."""

    name: str
    tokenizer: Tokenizer
    tokens: SpecialTokens


def error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 429 else None
    body = {
        "error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}
    }
    return JSONResponse(body, status_code=error.status, headers=headers)


async def read_body(request: Request, model: type[BaseModel], max_body_bytes: int) -> Any:
    """The request's JSON body validated as `model`: 413 when too large, 400 when malformed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise APIError(413, f"the request body exceeds {max_body_bytes} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise APIError(413, f"the request body exceeds {max_body_bytes} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"{param or 'body'}: {first['msg']}", param=param) from None


def sampling_params(
    body: _Request, prompt_tokens: int, context: int, default_max_tokens: int | None
) -> SamplingParams:
    """The request's sampling; `max_tokens` omitted: `default_max_tokens`, or the rest of the context."""
    room = context - prompt_tokens
    if room < 1:
        raise APIError(
            400, f"the prompt has {prompt_tokens} tokens; the model's context is {context}", param="prompt"
        )
    max_tokens = body.max_tokens or body.max_completion_tokens or min(default_max_tokens or room, room)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=stop,
        )
    except ValueError as error:
        raise APIError(400, str(error)) from None


class Streams:
    """The outputs of several engine requests (one per prompt) merged into one asyncio.Queue."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.requests = []

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> None:
        loop = asyncio.get_running_loop()
        try:
            for index, prompt in enumerate(prompts):

                def sink(output: Output, index: int = index) -> None:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, output))

                self.requests.append(self.engine.submit(prompt, params, sink))
        except RequestRejected as error:
            self.cancel()
            raise APIError(400, str(error), param="prompt") from None
        except QueueFull as error:
            self.cancel()
            raise APIError(429, f"the server is busy: {error}", kind="rate_limit_error") from None
        except ShuttingDown as error:
            self.cancel()
            raise APIError(503, str(error), kind="service_unavailable") from None

    def cancel(self) -> None:
        for request in self.requests:
            self.engine.cancel(request)

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        """Each output as it arrives, until every request has finished."""
        remaining = len(self.requests)
        while remaining:
            index, output = await self.queue.get()
            remaining -= output.finish_reason is not None
            yield index, output


def create_app(engine: Engine, served: ServedModel, *, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The API over `engine` (already started, or started by the caller)."""
    app = FastAPI(title="latentattn", docs_url=None, redoc_url=None, openapi_url=None)
    context = engine.max_context
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_EngineCollector(engine))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, str(error.errors()[:1])))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(error).__name__}", kind="server_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.accepting:
            raise APIError(503, "the server is shutting down", kind="service_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {
            "id": served.name,
            "object": "model",
            "created": 0,
            "owned_by": "latentattn",
            "max_model_len": context,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def encode(text: str) -> list[int]:
        return encode_prompt(served.tokenizer, served.tokens, text)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest, max_body_bytes)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [encode(p) if isinstance(p, str) else list(p) for p in prompt]
        if not prompts:
            raise APIError(400, "prompt: give at least one prompt", param="prompt")
        params = sampling_params(body, max(map(len, prompts)), context, default_max_tokens=16)
        return await _respond(request, engine, served, body, prompts, params, _completion_shapes)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, ChatRequest, max_body_bytes)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = chat_prompt(messages, served.tokens, served.tokenizer)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        params = sampling_params(body, len(prompt), context, default_max_tokens=None)
        return await _respond(request, engine, served, body, [prompt], params, _chat_shapes)

    return app


Shapes = tuple[str, str, Callable[[str, str | None, bool], dict[str, Any]]]
"""(object name, chunk object name, choice builder(text, finish_reason, first chunk))."""

_completion_shapes: Shapes = (
    "text_completion",
    "text_completion",
    lambda text, finish, first: {"text": text, "finish_reason": finish, "logprobs": None},
)
_chat_shapes: Shapes = (
    "chat.completion",
    "chat.completion.chunk",
    lambda text, finish, first: {
        "message": {"role": "assistant", "content": text},
        "delta": {"role": "assistant", "content": text} if first else {"content": text},
        "finish_reason": finish,
        "logprobs": None,
    },
)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _respond(
    request: Request,
    engine: Engine,
    served: ServedModel,
    body: _Request,
    prompts: list[list[int]],
    params: SamplingParams,
    shapes: Shapes,
) -> Response:
    """Submit one engine request per prompt; answer with the whole response or stream it."""
    streams = Streams(engine)
    streams.submit(prompts, params)
    header = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
    name, chunk_name, choice = shapes
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _stream(streams, header, chunk_name, choice, include_usage, chat=name == "chat.completion"),
            media_type="text/event-stream",
        )
    texts, reasons = [""] * len(prompts), [None] * len(prompts)
    usage = [(0, 0)] * len(prompts)
    try:
        async for index, output in _until_disconnected(request, streams):
            if output.error:
                raise APIError(500, f"the model failed: {output.error}", kind="server_error")
            texts[index] += output.text
            reasons[index] = output.finish_reason
            usage[index] = (output.prompt_tokens, output.completion_tokens)
    finally:
        streams.cancel()  # a no-op for finished requests
    choices = []
    for index, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        built = choice(text, reason, False)
        built.pop("delta", None)
        choices.append({"index": index, **built})
    total = _usage(sum(p for p, _ in usage), sum(c for _, c in usage))
    return JSONResponse({**header, "object": name, "choices": choices, "usage": total})


async def _until_disconnected(request: Request, streams: Streams) -> AsyncIterator[tuple[int, Output]]:
    """`streams.outputs()`, stopping (and cancelling) when the client disconnects."""
    outputs = streams.outputs()
    while True:
        task = asyncio.ensure_future(anext(outputs))
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not done and await request.is_disconnected():
                task.cancel()
                streams.cancel()
                raise APIError(499, "the client disconnected")
        try:
            yield task.result()
        except StopAsyncIteration:
            return


async def _stream(
    streams: Streams,
    header: dict[str, Any],
    chunk_name: str,
    choice: Callable[[str, str | None, bool], dict[str, Any]],
    include_usage: bool,
    *,
    chat: bool,
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per output, then usage (if asked), then `[DONE]`. Cancelled when the
    client disconnects (Starlette cancels this generator): the engine requests are cancelled then."""
    first = [True] * len(streams.requests)
    prompt_tokens = completion_tokens = 0
    try:
        async for index, output in streams.outputs():
            if output.error:
                error = {
                    "message": f"the model failed: {output.error}",
                    "type": "server_error",
                    "param": None,
                    "code": 500,
                }
                yield f"data: {json.dumps({'error': error})}\n\n"
                continue
            if not output.text and output.finish_reason is None and not first[index]:
                continue
            built = choice(output.text, output.finish_reason, first[index])
            if chat:
                built.pop("message")
            else:
                built.pop("delta", None)
            first[index] = False
            chunk = {**header, "object": chunk_name, "choices": [{"index": index, **built}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            if output.finish_reason is not None:
                prompt_tokens += output.prompt_tokens
                completion_tokens += output.completion_tokens
        if include_usage:
            usage = _usage(prompt_tokens, completion_tokens)
            yield f"data: {json.dumps({**header, 'object': chunk_name, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        streams.cancel()


class _EngineCollector:
    """Reads the engine's counters at each scrape (no module-level metrics: one registry per app)."""

    COUNTERS = frozenset(
        {
            "preemptions",
            "finished",
            "cancelled",
            "rejected",
            "prefix_query_tokens",
            "prefix_hit_tokens",
            "prompt_tokens",
            "generated_tokens",
            "steps",
            "step_seconds",
            "scheduler_seconds",
        }
    )

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list:
        return []

    def collect(self):
        for name, value in self.engine.metrics().items():
            family = CounterMetricFamily if name in self.COUNTERS else GaugeMetricFamily
            yield family(f"latentattn_{name}", name.replace("_", " "), value=value)
