"""The OpenAI-compatible HTTP layer: routes, server-sent events, errors, auth, metrics (FastAPI).

Thin by design: the endpoints' work is in :mod:`gptoss_jax.serving.chat`,
:mod:`~gptoss_jax.serving.responses` and :mod:`~gptoss_jax.serving.completions`, the OpenAI <->
Harmony translation in :mod:`~gptoss_jax.serving.translate`, the batching in the engine.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
input (malformed JSON, a missing or wrong-typed field, out-of-range values, a prompt plus its
tokens beyond the context), 401 without the right key, 404 for an unknown model, 429 when the
engine's queue is full, 503 while the model loads or after the engine stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gptoss_jax.serving import chat, completions, responses
from gptoss_jax.serving.protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from gptoss_jax.serving.state import ServerState
from gptoss_jax.serving.streaming import ApiError, api_error_of, merged_stream, sse, until_done_or_disconnected

def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over ``state`` (its engine may arrive later: 503 until then)."""
    app = FastAPI(title="gptoss-jax", description="OpenAI-compatible server for gpt-oss on JAX")
    app.state.server = state

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        problem = error.errors()[0]
        location = [str(part) for part in problem.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {problem.get('msg')}" if param else str(problem.get("msg"))
        return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

    async def guarded(request: Request, model: str | None, endpoint: Callable[[], Awaitable[Response]]) -> Response:
        """Auth, readiness and the model name; errors to OpenAI's shape."""
        if state.api_key is not None and request.headers.get("authorization") != f"Bearer {state.api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error",
                           code="invalid_api_key")
        if state.engine is None:
            detail = f": {state.load_error}" if state.load_error else ""
            raise ApiError(503, f"the model is loading{detail}", "server_error", code="loading")
        if model is not None and model != state.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")
        try:
            return await endpoint()
        except Exception as error:
            raise api_error_of(error) from error

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await guarded(request, body.model, lambda: _chat(state, body, request))

    @app.post("/v1/completions")
    async def text_completions(body: CompletionRequest, request: Request) -> Response:
        return await guarded(request, body.model, lambda: completions.complete(state, body, request))

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return await guarded(request, body.model, lambda: responses.respond(state, body, request))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def listing() -> Response:
            return JSONResponse(dict(object="list", data=[dict(id=state.model_name, object="model",
                                                              created=state.created, owned_by="gptoss-jax")]))
        return await guarded(request, None, listing)

    @app.get("/health")
    async def health() -> Response:
        if state.engine is None:
            return JSONResponse(dict(status="loading"), status_code=503)
        return JSONResponse(dict(status="ok", running=state.engine.running, waiting=state.engine.waiting))

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _chat(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    if not body.stream:
        choices, prompt_tokens = chat.prepare(state, body, None)
        results = await until_done_or_disconnected(request, asyncio.gather(*(choice.run() for choice in choices)))
        return JSONResponse(chat.completion_object(state, list(results), prompt_tokens))

    chunks: asyncio.Queue = asyncio.Queue()
    choices, prompt_tokens = chat.prepare(state, body, chunks.put_nowait)
    header = chat.completion_object(state, [], prompt_tokens)
    identity = dict(id=header["id"], object="chat.completion.chunk", created=header["created"], model=state.model_name)
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        async for event in merged_stream([choice.run for choice in choices], chunks,
                                         lambda chunk: sse(dict(identity, choices=[chunk]))):
            yield event
        if not chunks.empty():  # the runs finished: their results are the last item
            results = chunks.get_nowait()
            usage = chat.completion_object(state, results, prompt_tokens)["usage"]
            if include_usage:
                yield sse(dict(identity, choices=[], usage=usage))
            yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
