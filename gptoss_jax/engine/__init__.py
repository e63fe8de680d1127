"""The continuous-batching inference engine (no HTTP in it): see :mod:`gptoss_jax.engine.scheduler`."""

from gptoss_jax.engine.requests import (
    Delta, EngineClosedError, FinishReason, QueueFullError, RequestError, RequestHandle, RequestResult,
    SamplingParams, TokenLogprob,
)
from gptoss_jax.engine.scheduler import Engine, EngineSizeError

__all__ = [
    "Delta", "Engine", "EngineClosedError", "EngineSizeError", "FinishReason", "QueueFullError", "RequestError",
    "RequestHandle", "RequestResult", "SamplingParams", "TokenLogprob",
]
