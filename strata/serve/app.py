"""The HTTP side of ``strata serve``: OpenAI's completions and chat completions (whole or streamed
as server-sent events), the model list, health and Prometheus metrics, over one ``Engine``.

Every refusal is a JSON error in OpenAI's shape naming the field at fault: 400 for a body that is
not JSON or a request the model cannot serve (a prompt longer than its context, no chat
template), 404 for another model's name, 422 for a field of the wrong type, out of range or
unknown, 429 when the queue is full. A client that goes away cancels its request; the engine
frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from strata.data.tokenizer import Tokenizer
from strata.serve.api import ChatRequest, CompletionRequest
from strata.serve.chat import ChatTemplate, TemplateError
from strata.serve.engine import Done, Engine, Failed, QueueFull, Request, Sampling
from strata.serve.metrics import prometheus_text
from strata.serve.responses import ChatChoices, CompletionChoices

# A chat request without max_tokens to a model without a context (no attention) stops here.
DEFAULT_CHAT_TOKENS = 512
# How often a request that waits for its answer checks that its client is still there.
DISCONNECT_POLL_S = 0.2


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {429: "rate_limit_error", 500: "server_error"}.get(self.status, "invalid_request_error")
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


@dataclass
class Served:
    """What the server serves: the engine, the name clients ask for, and the model's limits."""

    engine: Engine
    name: str
    tokenizer: Tokenizer
    context: int | None  # tokens a prompt and its continuation may span; None: no limit
    chat: ChatTemplate | None


def create_app(served: Served) -> FastAPI:
    """The ASGI app; whoever serves it runs the engine (``Engine.run`` or ``Engine.start``)."""
    app = FastAPI(title="strata serve")
    responses: Counter = Counter()
    app.add_middleware(_CountResponses, counts=responses)

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}").response()
        # The field as the client named it (pydantic adds the member of a union it tried: stop.str).
        field = str(first["loc"][1]) if len(first["loc"]) > 1 else None
        return APIError(422, f"{field or 'body'}: {first['msg']}", param=field, code=first["type"]).response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        entry = {"id": served.name, "object": "model", "created": 0, "owned_by": "strata", "max_model_len": served.context}
        return {"object": "list", "data": [entry]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return prometheus_text(served.engine, responses)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        _check_model(served, body.model)
        prompts = [_prompt_ids(served, prompt) for prompt in body.prompts()]
        max_tokens = body.max_tokens
        for ids in prompts:
            _check_length(served, ids, max_tokens, "prompt")
        sampling = body.sampling(max_tokens, body.logprobs, frozenset())
        return await _answer(served, http, CompletionChoices(served.name, served.tokenizer, body, prompts), prompts, sampling)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        _check_model(served, body.model)
        if served.chat is None:
            raise APIError(400, f"the model {served.name} has no chat template (chat_template.jinja, or chat_template in "
                                "tokenizer_config.json, beside its tokenizer); use /v1/completions", param="messages")
        try:
            ids = served.chat.encode([message.model_dump(exclude_none=True) for message in body.messages])
        except TemplateError as error:
            raise APIError(400, str(error), param="messages") from None
        max_tokens = body.requested_tokens()
        if max_tokens is None:
            max_tokens = DEFAULT_CHAT_TOKENS if served.context is None else max(served.context - len(ids), 1)
        _check_length(served, ids, max_tokens, "max_completion_tokens" if body.max_completion_tokens else "messages")
        sampling = body.sampling(max_tokens, body.logprob_count(), served.chat.end_tokens)
        return await _answer(served, http, ChatChoices(served.name, served.tokenizer, body), [ids], sampling)

    return app


class _CountResponses:
    """Counts responses by path and status for /metrics (plain ASGI: streaming passes through)."""

    def __init__(self, app, counts: Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting(message):
            if message["type"] == "http.response.start":
                self.counts[(scope["path"], message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting)


def _check_model(served: Served, name: str) -> None:
    if name != served.name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served.name!r}", param="model",
                       code="model_not_found")


def _prompt_ids(served: Served, prompt: str | list[int]) -> list[int]:
    tokenizer = served.tokenizer
    if isinstance(prompt, str):
        return [tokenizer.bos_id, *tokenizer.encode(prompt.encode("utf-8")).tolist()]
    bad = [token for token in prompt if token >= served.engine.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the model's vocabulary of {served.engine.vocab_size}",
                       param="prompt")
    return list(prompt)


def _check_length(served: Served, ids: list[int], max_tokens: int, param: str) -> None:
    context = served.context
    if context is None:
        return
    if len(ids) > context:
        raise APIError(400, f"the prompt is {len(ids):,} tokens, longer than the model's context of {context:,}",
                       param=param, code="context_length_exceeded")
    if len(ids) + max_tokens > context:
        raise APIError(400, f"max_tokens {max_tokens:,}: the prompt's {len(ids):,} tokens and as many new ones exceed "
                            f"the model's context of {context:,}; ask for at most {context - len(ids):,}",
                       param="max_tokens", code="context_length_exceeded")


class _Submission:
    """A request's prompts in the engine, and the events they send, in one asyncio queue."""

    def __init__(self, engine: Engine, prompts: list[list[int]], sampling: Sampling):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.requests = []
        for index, ids in enumerate(prompts):
            def emit(event, index=index):
                loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

            self.requests.append(Request(ids, sampling, emit))
        try:
            for request in self.requests:
                engine.submit(request)
        except QueueFull as error:
            self.cancel()
            raise APIError(429, f"the server is busy: {error}; try again later") from None
        self.open = len(self.requests)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True

    async def next(self, http: HTTPRequest):
        """The next (prompt index, event), or None once every prompt is done; cancels the request
        when the client has gone."""
        while self.open:
            try:  # an event already there is taken at once, without the timer of wait_for
                index, event = self.events.get_nowait() if not self.events.empty() else \
                    await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await http.is_disconnected():
                    self.cancel()
                    return None
                continue
            if isinstance(event, (Done, Failed)):
                self.open -= 1
            if isinstance(event, Failed):
                self.cancel()
                raise APIError(500, f"the engine failed on this request: {event.message}")
            return index, event
        return None


async def _answer(served: Served, http: HTTPRequest, shape, prompts: list[list[int]], sampling: Sampling):
    submission = _Submission(served.engine, prompts, sampling)
    if shape.body.stream:
        return StreamingResponse(_stream(submission, http, shape), media_type="text/event-stream")
    try:
        while (item := await submission.next(http)) is not None:
            shape.take(*item)
    finally:
        submission.cancel()  # a no-op when every prompt is done
    return shape.whole()


async def _stream(submission: _Submission, http: HTTPRequest, shape) -> AsyncIterator[str]:
    try:
        for chunk in shape.opening():
            yield _event(chunk)
        while (item := await submission.next(http)) is not None:
            for chunk in shape.chunks(*item):
                yield _event(chunk)
        options = shape.body.stream_options
        if options is not None and options.include_usage:
            yield _event(shape.envelope([], usage=shape.usage()))
        yield "data: [DONE]\n\n"
    except APIError as error:
        yield _event({"error": {"message": error.message, "type": "server_error"}})
    finally:
        submission.cancel()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
