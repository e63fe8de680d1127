"""The continuous-batching engine: exactness beside other requests, stops, cancellation, refusals.

The model is the tiny preset in float32 on the CPU, where a row's numbers do not depend on the
other rows of its batch, so a request's tokens must be identical alone and in company. The mesh
check runs in a subprocess with 8 CPU devices (this file as a script), as test_sharding does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.config import preset
from gptoss_jax.engine import (
    Engine, EngineClosedError, EngineSizeError, QueueFullError, RequestError, SamplingParams,
)
from gptoss_jax.errors import GptOssError
from gptoss_jax.generate import generate
from gptoss_jax.model import GptOss

REPO = Path(__file__).resolve().parents[1]
CHUNK = 16
CONTEXT = 160


def _model(mesh=None):
    return GptOss(preset("tiny"), dtype=jnp.float32, mesh=mesh, rngs=nnx.Rngs(0))


def _workload(count: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """Requests of mixed prompt and output lengths: greedy, and seeded sampling with and without filters."""
    rng = np.random.default_rng(seed)
    settings = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9),
                dict(temperature=1.2, top_k=5)]
    requests = []
    for index in range(count):
        prompt = rng.integers(0, 512, int(rng.integers(2, 60))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(1, 30)), seed=index, **settings[index % len(settings)])
        requests.append((prompt, params))
    return requests


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def engine(model):
    with Engine(model, max_batch=16, max_context=CONTEXT, prefill_chunk=CHUNK, max_queue=64) as engine:
        yield engine


@pytest.fixture(scope="module")
def alone(engine):
    """Each workload request run by itself on the engine (nothing else in it)."""
    return [engine.submit(prompt, params).result(timeout=120).tokens for prompt, params in _workload(20)]


def test_requests_get_the_same_tokens_beside_others_that_come_and_go(engine, alone):
    """20 requests over 16 slots, arriving in three waves while others decode and finish."""
    requests = _workload(20)
    handles = [engine.submit(*request) for request in requests[:6]]
    next(iter(handles[0]))  # the first wave is decoding
    handles += [engine.submit(*request) for request in requests[6:14]]
    time.sleep(0.05)
    handles += [engine.submit(*request) for request in requests[14:]]
    results = [handle.result(timeout=120) for handle in handles]
    assert [result.tokens for result in results] == alone
    for result, (_, params) in zip(results, requests):
        assert result.finish_reason == "length" and result.completion_tokens == params.max_tokens


def test_greedy_tokens_equal_generate(model, engine):
    requests = [(prompt, params) for prompt, params in _workload(8) if params.temperature == 0]
    prompts = [prompt for prompt, _ in requests]
    expected = generate(model, prompts, max_new_tokens=12, temperature=0, prefill_chunk_size=CHUNK).tokens
    handles = [engine.submit(prompt, max_tokens=12, temperature=0) for prompt in prompts]
    assert [handle.result(timeout=120).tokens for handle in handles] == expected


def test_a_stop_token_ends_the_request_and_is_kept(engine, alone):
    prompt, params = _workload(20)[4]  # greedy, 20+ tokens
    tokens = alone[4]
    stop = tokens[5]
    result = engine.submit(prompt, max_tokens=params.max_tokens, temperature=0, stop_token_ids=[stop]).result(60)
    assert result.finish_reason == "stop"
    assert result.tokens == tokens[:tokens.index(stop) + 1]


def test_logprobs_are_the_untempered_ones_with_the_most_likely_alternatives(model, engine):
    prompt = _workload(1)[0][0]
    expected = generate(model, [prompt], max_new_tokens=6, temperature=0, return_logprobs=True)
    result = engine.submit(prompt, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3).result(60)
    assert result.tokens == expected.tokens[0]
    np.testing.assert_allclose([entry.logprob for entry in result.logprobs], expected.logprobs[0], atol=1e-5)
    for entry in result.logprobs:
        assert len(entry.top) == 3
        assert entry.top[0] == (entry.token, pytest.approx(entry.logprob, abs=1e-6))  # greedy: the best one
        assert entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
    assert engine.submit(prompt, max_tokens=2, temperature=0).result(60).logprobs is None


def test_cancelling_mid_stream_frees_the_slot_for_a_waiting_request(model, alone):
    first_prompt, _ = _workload(20)[1]
    waiting_prompt, waiting_params = _workload(20)[0]
    with Engine(model, max_batch=1, max_context=CONTEXT, prefill_chunk=CHUNK, burst_steps=2) as engine:
        running = engine.submit(first_prompt, max_tokens=100, temperature=0)
        waiting = engine.submit(waiting_prompt, waiting_params)
        stream = iter(running)
        next(stream)
        assert engine.waiting == 1
        running.cancel()
        list(stream)  # the stream ends
        result = running.result(60)
        assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 100
        assert waiting.result(60).tokens == alone[0]


def test_a_full_queue_refuses_at_once_and_disturbs_nothing(model, alone):
    prompt, params = _workload(20)[0]
    with Engine(model, max_batch=1, max_context=CONTEXT, prefill_chunk=CHUNK, max_queue=1) as engine:
        running = engine.submit(prompt, params)
        next(iter(running))  # admitted: the queue is empty again
        waiting = engine.submit(prompt, params)
        with pytest.raises(QueueFullError, match="max_queue=1"):
            engine.submit(prompt, params)
        assert running.result(60).tokens == alone[0] and waiting.result(60).tokens == alone[0]


@pytest.mark.parametrize("prompt, settings, message", [
    (list(range(CONTEXT)), {}, f"leaves no room for a token in the engine's context of {CONTEXT}"),
    (list(range(100)), dict(max_tokens=61), f"plus max_tokens \\(61\\) exceeds the engine's context of {CONTEXT}"),
    ([], {}, "the prompt is empty"),
    ([1, 512], {}, "outside the vocabulary \\[0, 512\\)"),
    ("hello", {}, "token ids, not text"),
    ([[1, 2]], {}, "flat sequence"),
    ([1.5], {}, "integer token ids"),
    ([1], dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    ([1], dict(temperature=-1), "temperature must be from 0"),
    ([1], dict(top_p=0), "top_p must be in \\(0, 1\\]"),
    ([1], dict(top_k=0), "top_k must be an integer >= 1"),
    ([1], dict(stop_token_ids=list(range(17))), "at most 16 stop token ids"),
    ([1], dict(stop_token_ids=[600]), "stop token ids must be in the vocabulary"),
    ([1], dict(logprobs=True, top_logprobs=21), "top_logprobs must be from 0 to 20"),
    ([1], dict(top_logprobs=2), "top_logprobs needs logprobs=True"),
])
def test_bad_requests_are_refused_at_submit_while_others_run(engine, alone, prompt, settings, message):
    workload_prompt, params = _workload(20)[0]
    running = engine.submit(workload_prompt, params)
    with pytest.raises(RequestError, match=message) as refused:
        engine.submit(prompt, **settings)
    assert isinstance(refused.value, GptOssError)
    assert running.result(60).tokens == alone[0]


def test_handles_stream_to_asyncio(engine, alone):
    prompt, params = _workload(20)[3]

    async def consume():
        handle = engine.submit(prompt, params)
        tokens = [token async for delta in handle for token in delta.tokens]
        return tokens, await handle.result_async()

    tokens, result = asyncio.run(consume())
    assert tokens == result.tokens == alone[3]
    assert result.time_to_first_token > 0 and len(result.token_times) == len(tokens)


def test_sizes_that_do_not_fit_are_refused_with_the_figures(model):
    with pytest.raises(EngineSizeError, match=r"a KV cache of 64 rows x 160 positions takes 0\.\d+ GB"):
        Engine(model, max_batch=64, max_context=CONTEXT, memory_fraction=1e-6)
    with pytest.raises(EngineSizeError, match="prefill_chunk must be a power of two"):
        Engine(model, prefill_chunk=24)
    with Engine(model, max_batch=None, max_context=CONTEXT) as sized:  # from memory: many rows of a tiny model
        assert sized.max_batch == 1024


def test_a_failing_device_step_ends_every_request_with_an_error(model, monkeypatch):
    prompt, params = _workload(1)[0]
    with Engine(model, max_batch=2, max_context=CONTEXT, prefill_chunk=CHUNK) as engine:
        def broken(*args, **kwargs):
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine, "_decode", broken)
        handles = [engine.submit(prompt, params) for _ in range(3)]
        for handle in handles:
            with pytest.raises(EngineClosedError, match="the engine failed: device lost"):
                handle.result(60)
        with pytest.raises(EngineClosedError, match="device lost"):
            engine.submit(prompt, params)


def test_closing_ends_running_and_waiting_requests(model):
    prompt, _ = _workload(1)[0]
    engine = Engine(model, max_batch=1, max_context=CONTEXT, prefill_chunk=CHUNK)
    running = engine.submit(prompt, max_tokens=100, temperature=0)
    waiting = engine.submit(prompt, max_tokens=100, temperature=0)
    next(iter(running))
    engine.close()
    for handle in (running, waiting):
        with pytest.raises(EngineClosedError, match="closed"):
            handle.result(10)
    with pytest.raises(EngineClosedError):
        engine.submit(prompt)


def test_on_a_mesh_of_8_devices_requests_get_their_single_device_tokens(alone):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == alone


def _mesh_worker() -> None:
    """Run the workload on a data=2,expert=2,tensor=2 mesh, in waves; print the tokens as JSON."""
    from gptoss_jax.sharding import make_mesh

    model = _model(make_mesh("data=2,expert=2,tensor=2"))
    requests = _workload(20)
    with Engine(model, max_batch=16, max_context=CONTEXT, prefill_chunk=CHUNK) as engine:
        handles = [engine.submit(*request) for request in requests[:10]]
        next(iter(handles[0]))
        handles += [engine.submit(*request) for request in requests[10:]]
        print(json.dumps([handle.result(timeout=600).tokens for handle in handles]))


if __name__ == "__main__":
    _mesh_worker()
