"""Errors in OpenAI's shape, server-sent events, and following requests while the client is there."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request

from gptoss_jax.engine import EngineClosedError, QueueFullError
from gptoss_jax.errors import GptOssError

DISCONNECT_POLL_SECONDS = 0.25


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return dict(error=dict(message=self.message, type=self.kind, param=self.param, code=self.code))


def api_error_of(error: BaseException) -> ApiError:
    """The HTTP error for an exception an endpoint raised."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, QueueFullError):
        return ApiError(429, f"the server is busy: {error}", "rate_limit_error", code="queue_full")
    if isinstance(error, EngineClosedError):
        return ApiError(503, str(error), "server_error", code="engine_stopped")
    if isinstance(error, GptOssError):
        return ApiError(400, str(error))
    raise error


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def merged_stream(runs: Sequence[Callable[[], Awaitable[Any]]], chunks: asyncio.Queue,
                        render: Callable[[Any], str]) -> AsyncIterator[str]:
    """Run ``runs`` at once, yielding ``render(chunk)`` for every chunk they put on ``chunks``.

    Returns their results through ``chunks``' last item; a failure (the engine stopped) becomes
    an error event. Closing the stream (the client went away) cancels the runs, and so their
    requests.
    """
    finished = object()

    async def run(job: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await job()
        finally:
            chunks.put_nowait(finished)

    tasks = [asyncio.create_task(run(job)) for job in runs]
    try:
        remaining = len(tasks)
        while remaining:
            chunk = await chunks.get()
            if chunk is finished:
                remaining -= 1
            else:
                yield render(chunk)
        results = [task.result() for task in tasks]
        chunks.put_nowait(results)
    except (EngineClosedError, GptOssError) as error:
        yield sse(api_error_of(error).body())
    finally:
        for task in tasks:
            task.cancel()


async def until_done_or_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client goes away first, cancel it (and so its requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "the client closed the connection")
    finally:
        if not task.done():
            task.cancel()
