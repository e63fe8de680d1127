"""The request bodies the server accepts, validated with pydantic (OpenAI's field names and bounds).

Fields OpenAI defines and this server does not use are accepted and ignored, so the official
client's requests pass as they are.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gptoss_jax.engine.requests import MAX_TOP_LOGPROBS


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    thinking_token_budget: int | None = Field(None, ge=0)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    stream_options: StreamOptions | None = None


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Request):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    reasoning: Reasoning | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool = True
    text: dict[str, Any] | None = None
    thinking_token_budget: int | None = Field(None, ge=0)
