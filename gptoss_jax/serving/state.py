"""What the server's endpoints share: the engine, the tokenizer, the metrics, the response store."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gptoss_jax.engine import Engine, RequestResult
from gptoss_jax.harmony import Message
from gptoss_jax.tokenizer import Tokenizer

RESPONSE_STORE_SIZE = 1024
"""Responses kept for ``previous_response_id`` (the oldest are forgotten first)."""


class Metrics:
    """Prometheus metrics of one server (its own registry, so several servers in a process do not clash)."""

    def __init__(self, server: ServerState):
        self.registry = CollectorRegistry()
        running = Gauge("gptoss_requests_running", "Requests in an engine slot", registry=self.registry)
        waiting = Gauge("gptoss_requests_waiting", "Requests queued for a slot", registry=self.registry)
        running.set_function(lambda: server.engine.running if server.engine else 0)
        waiting.set_function(lambda: server.engine.waiting if server.engine else 0)
        self.requests = Counter("gptoss_requests", "Finished requests, by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.tokens = Counter("gptoss_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("gptoss_prefix_cache_query_tokens", "Prompt tokens of finished requests, "
                                     "each looked up in the prefix cache", registry=self.registry)
        self.cached_tokens = Counter("gptoss_prefix_cache_hit_tokens", "Of those, the ones taken from the prefix "
                                     "cache (or from a request with the same prompt) instead of computed",
                                     registry=self.registry)
        pool_blocks = Gauge("gptoss_prefix_cache_blocks", "Blocks of the prefix cache's pool", ["state"],
                            registry=self.registry)
        index = lambda: server.engine.prefix_index if server.engine else None  # noqa: E731 (None while loading)
        pool_blocks.labels("used").set_function(lambda: index().used if index() else 0)
        pool_blocks.labels("capacity").set_function(lambda: index().capacity if index() else 0)
        self.ttft = Histogram("gptoss_time_to_first_token_seconds", "Time from submit to the first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.itl = Histogram("gptoss_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=self.registry)

    def record(self, result: RequestResult) -> None:
        self.requests.labels(result.finish_reason).inc()
        self.tokens.inc(result.completion_tokens)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.cached_tokens.inc(result.cached_tokens)
        if result.time_to_first_token is not None:
            self.ttft.observe(result.time_to_first_token)
        for earlier, later in zip(result.token_times, result.token_times[1:]):
            self.itl.observe(later - earlier)


@dataclasses.dataclass
class StoredResponse:
    """A finished response's conversation (its input and its output), for ``previous_response_id``."""

    messages: list[Message]
    instructions: str | None
    call_names: dict[str, str]  # call id -> function name, for function_call_output items


class ServerState:
    """The server's shared parts. ``engine`` is None while the model loads (the endpoints answer 503)."""

    def __init__(self, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
                 engine: Engine | None = None):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.engine = engine
        self.load_error: BaseException | None = None
        self.created = int(time.time())
        self.metrics = Metrics(self)
        self._responses: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()
        self._lock = threading.Lock()

    def store_response(self, response_id: str, stored: StoredResponse) -> None:
        with self._lock:
            self._responses[response_id] = stored
            while len(self._responses) > RESPONSE_STORE_SIZE:
                self._responses.popitem(last=False)

    def stored_response(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._responses.get(response_id)
