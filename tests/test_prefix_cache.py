"""The prefix cache and prompts computed once: a request served from the cache gets exactly its tokens
with the cache off (greedy, seeded sampling, log-probabilities).

The tiny preset in float32 on the CPU (sliding window 8), with blocks of 16 tokens so a prompt
spans many blocks. The mesh case runs in a subprocess with 8 CPU devices, as test_engine's does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.config import preset
from gptoss_jax.engine import Engine, EngineSizeError, SamplingParams
from gptoss_jax.engine import prefix_cache
from gptoss_jax.engine.programs import BlockSaves, prefill_chunk
from gptoss_jax.kv_cache import KVCache
from gptoss_jax.model import GptOss
from pallas_kernels.attention_reference import EMPTY_SLOT

REPO = Path(__file__).resolve().parents[1]
BLOCK = 16
CONTEXT = 384
SETTINGS = {
    "greedy": SamplingParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=2),
    "seeded": SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, logprobs=True),
}


def _model(mesh=None):
    return GptOss(preset("tiny"), dtype=jnp.float32, mesh=mesh, rngs=nnx.Rngs(0))


def _engine(model, **options) -> Engine:
    options = dict(dict(max_batch=8, max_context=CONTEXT, prefill_chunk=16, prefill_budget=64, prefix_block=BLOCK),
                   **options)
    return Engine(model, **options)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def cached(model):
    with _engine(model) as engine:
        yield engine


@pytest.fixture(scope="module")
def uncached(model):
    with _engine(model, prefix_caching=False) as engine:
        yield engine


def _tokens(rng: np.random.Generator, count: int) -> list[int]:
    return rng.integers(0, 512, count).tolist()


def _agent_loop(engine: Engine, params: SamplingParams, rounds: int = 5, seed: int = 0):
    """A conversation that resends itself: each round appends the reply and a tool result.

    Returns each round's (tokens, log-probabilities, cached tokens).
    """
    rng = np.random.default_rng(seed)
    prompt = _tokens(rng, 37)
    outcomes = []
    for tool in _tool_result_sizes(seed, rounds):
        result = engine.submit(prompt, params).result(timeout=120)
        outcomes.append((result.tokens, [entry.logprob for entry in result.logprobs], result.cached_tokens))
        prompt = prompt + result.tokens + _tokens(rng, tool)
    return outcomes


def _tool_result_sizes(seed: int, rounds: int = 5) -> list[int]:
    return np.random.default_rng(seed + 1000).integers(5, 30, rounds).tolist()


def _same_result(result, expected) -> None:
    """One request's tokens equal, its logprobs within float32 noise."""
    assert result.tokens == expected.tokens
    np.testing.assert_allclose([e.logprob for e in result.logprobs], [e.logprob for e in expected.logprobs],
                               rtol=0, atol=1e-6)


def _same_outputs(got, expected) -> None:
    for (tokens, logprobs, _), (expected_tokens, expected_logprobs, _) in zip(got, expected, strict=True):
        assert tokens == expected_tokens
        np.testing.assert_allclose(logprobs, expected_logprobs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("settings", SETTINGS)
def test_an_agent_loop_gets_its_uncached_tokens_and_hits_its_earlier_rounds(cached, uncached, settings):
    # Seeds differ per case so no two cases share a conversation (each would hit the other's blocks).
    seed = list(SETTINGS).index(settings) + 1
    expected = _agent_loop(uncached, SETTINGS[settings], seed=seed)
    got = _agent_loop(cached, SETTINGS[settings], seed=seed)
    _same_outputs(got, expected)
    assert got[0][2] == 0 and all(cached_tokens == 0 for *_, cached_tokens in expected)
    # Round k resends round k-1's prompt and reply: all of its cache is hit, its prompt and its
    # reply but the last token (sampled, never fed through the model).
    prompt = 37
    for (tokens, _, _), (_, _, cached_tokens), tool in zip(got, got[1:], _tool_result_sizes(seed)):
        assert cached_tokens == prompt + len(tokens) - 1
        prompt += len(tokens) + tool


def test_a_reply_ending_at_its_first_token_keeps_its_prompt_for_the_next_round(cached, uncached):
    """A stop token as the first token: the finished row holds exactly its prompt, kept as a tail."""
    rng = np.random.default_rng(17)
    prompt = _tokens(rng, 2 * BLOCK + 7)
    stop = uncached.submit(prompt, SETTINGS["greedy"]).result(60).tokens[0]
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop], logprobs=True)
    first = cached.submit(prompt, params).result(60)
    assert first.tokens == [stop] and first.finish_reason == "stop"
    following = prompt + [stop] + _tokens(rng, 6)
    result = cached.submit(following, params).result(60)
    assert result.cached_tokens == len(prompt)
    _same_result(result, uncached.submit(following, params).result(60))


def test_prompts_sharing_part_of_a_block_hit_only_the_whole_blocks(cached, uncached):
    rng = np.random.default_rng(10)
    shared = _tokens(rng, BLOCK + 5)
    first, second = shared + _tokens(rng, 9), shared + _tokens(rng, 12)
    params = SETTINGS["greedy"]
    assert cached.submit(first, params).result(60).cached_tokens == 0
    result = cached.submit(second, params).result(60)
    assert result.cached_tokens == BLOCK
    assert result.tokens == uncached.submit(second, params).result(60).tokens


def test_a_chunk_spanning_several_blocks_keeps_each_with_its_rings(model, uncached, monkeypatch):
    # Chunks of 4 blocks: a lone prompt goes in 2 calls, not 6, and every block a chunk completes
    # is kept with its sliding rings as they were at its end: a prompt that shares 3 of them
    # (the middle of the first chunk) restores 3 blocks and gets its uncached tokens.
    rng = np.random.default_rng(16)
    first = _tokens(rng, 5 * BLOCK + 7)
    second = first[:3 * BLOCK + 4] + _tokens(rng, 2 * BLOCK)
    params = SETTINGS["seeded"]
    with _engine(model, prefill_chunk=4 * BLOCK, prefill_budget=4 * BLOCK) as engine:
        widths = []
        prefill = engine._prefill

        def counted(*args, **kwargs):
            widths.append(args[4].shape[1])  # tokens [rows, width]
            return prefill(*args, **kwargs)

        monkeypatch.setattr(engine, "_prefill", counted)
        engine.submit(first, params).result(60)
        assert widths == [4 * BLOCK, 2 * BLOCK]
        result = engine.submit(second, params).result(60)
    assert result.cached_tokens == 3 * BLOCK
    _same_result(result, uncached.submit(second, params).result(60))


def test_a_prompt_of_whole_cached_blocks_computes_its_last_token(cached, uncached):
    prompt = _tokens(np.random.default_rng(11), 3 * BLOCK)
    params = SETTINGS["seeded"]
    cached.submit(prompt, params).result(60)
    result = cached.submit(prompt, params).result(60)
    assert result.cached_tokens == 3 * BLOCK - 1
    _same_result(result, uncached.submit(prompt, params).result(60))


def test_an_evicted_prefix_is_computed_again(model, uncached):
    rng = np.random.default_rng(12)
    blocks = 4
    first, other = _tokens(rng, blocks * BLOCK + 3), _tokens(rng, blocks * BLOCK + 3)
    params = SETTINGS["greedy"]
    per_block = prefix_cache.block_bytes(model.config, BLOCK, model.dtype)
    with _engine(model, prefix_cache_bytes=blocks * per_block) as engine:
        assert engine.prefix_index.capacity == blocks
        engine.submit(first, params).result(60)
        assert engine.submit(first, params).result(60).cached_tokens == blocks * BLOCK
        engine.submit(other, params).result(60)  # takes every block
        result = engine.submit(first, params).result(60)
    assert result.cached_tokens == 0
    assert result.tokens == uncached.submit(first, params).result(60).tokens


def test_requests_admitted_together_compute_a_shared_prompt_once(cached, uncached):
    rng = np.random.default_rng(13)
    prompt = _tokens(rng, 2 * BLOCK + 7)
    requests = [(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=seed)) for seed in range(4)]
    requests += [(prompt + _tokens(rng, 3), SETTINGS["greedy"])]
    computed_before = cached.prompt_tokens - cached.cached_prompt_tokens
    handles = [cached.submit(*request) for request in requests]
    results = [handle.result(60) for handle in handles]
    assert [result.tokens for result in results] == [uncached.submit(*request).result(60).tokens
                                                     for request in requests]
    assert sorted(result.cached_tokens for result in results[:4]) == [0] + [prompt.__len__()] * 3
    # The prompt once, and the longer prompt's tail (it may hit the first's blocks or run beside it).
    computed = cached.prompt_tokens - cached.cached_prompt_tokens - computed_before
    assert computed <= len(prompt) + len(requests[-1][0])


def test_a_request_cancelled_during_prefill_leaves_its_follower_and_the_cache_exact(model, uncached, monkeypatch):
    prompt = _tokens(np.random.default_rng(14), 5 * BLOCK + 2)
    params = SETTINGS["greedy"]
    with _engine(model, prefill_budget=16) as engine:
        leader = engine.submit(prompt, params)
        follower = engine.submit(prompt, params)
        plan = engine._completed_blocks

        def plan_then_cancel(call):
            saves = plan(call)
            leader.cancel()  # as its first block goes in: mid-prefill
            return saves

        monkeypatch.setattr(engine, "_completed_blocks", plan_then_cancel)
        assert leader.result(60).finish_reason == "cancelled"
        expected = uncached.submit(prompt, params).result(60).tokens
        assert follower.result(60).tokens == expected
        monkeypatch.setattr(engine, "_completed_blocks", plan)
        again = engine.submit(prompt, params).result(60)
        assert again.tokens == expected and again.cached_tokens == 5 * BLOCK


def test_prompts_admitted_together_are_prefilled_in_few_calls(model, monkeypatch):
    rng = np.random.default_rng(15)
    prompts = [_tokens(rng, 12) for _ in range(8)]
    with _engine(model, prefill_budget=128, burst_steps=1, burst_steps_busy=1) as engine:
        calls = []
        prefill = engine._prefill

        def counted(*args, **kwargs):
            calls.append(args[4].shape)  # tokens [rows, width]
            return prefill(*args, **kwargs)

        monkeypatch.setattr(engine, "_prefill", counted)
        engine._condition.acquire()  # hold the engine until every request has arrived
        handles = [engine.submit(prompt, max_tokens=2, temperature=0) for prompt in prompts]
        engine._condition.release()
        for handle in handles:
            handle.result(60)
    assert calls == [(8, 16)]


@pytest.mark.parametrize(("length", "ring_end"), [(2 * BLOCK, 2 * BLOCK), (2 * BLOCK - 1, 2 * BLOCK),
                                                  (3 * BLOCK, 3 * BLOCK), (3 * BLOCK - 1, 3 * BLOCK),
                                                  (2 * BLOCK + 5, 2 * BLOCK + 5), (BLOCK + 11, BLOCK + 11), (3, 3)])
def test_a_restored_prefix_is_the_cache_a_prefill_to_its_length_leaves(model, length, ring_end):
    """Every layer, every slot: the positions held exactly as a prefill to ``length`` leaves them, the
    rings' included (a ring restored one position off fails), and the keys and values computed for
    them. The one ring entry no later query sees (position ``length - window``, there when ``length``
    is a block end less one) may be empty: the next token's write takes its slot. A ``ring_end`` off
    a block end is a tail's (saved where slot 0's cache ends), the window larger than 3 included."""
    config = model.config
    graphdef, state = nnx.split(model)
    prompt = np.asarray(_tokens(np.random.default_rng(16), 3 * BLOCK + 5), np.int32)
    cache = KVCache.create(config, 2, 128, jnp.float32)

    def run(cache, slot, start, end, first):
        tokens = jnp.asarray(prompt[None, start:end])
        positions = jnp.arange(start, end, dtype=jnp.int32)[None]
        _, cache = prefill_chunk(graphdef, state, cache, jnp.asarray([slot]), tokens, positions,
                                 jnp.asarray([end - start - 1]), first=first)
        return cache

    # Slot 0 computes the blocks and keeps them in a pool; slot 1 computes exactly `length` tokens.
    pool = prefix_cache.create_pool(config, 4, BLOCK, jnp.float32)
    ends = [(block + 1) * BLOCK for block in range(3 if ring_end % BLOCK == 0 else ring_end // BLOCK)]
    for block, end in enumerate(ends + ([ring_end] if ring_end % BLOCK else [])):  # the tail's saved at ring_end
        cache = run(cache, 0, block * BLOCK, end, first=block == 0)
        pool = prefix_cache.save_blocks(cache, pool, jnp.asarray([0]), jnp.asarray([block * BLOCK]),
                                        jnp.asarray([3 - block]))  # blocks out of order in the pool
    reference = run(cache, 1, 0, length, first=True)
    restored = prefix_cache.restore_prefix(cache, pool, jnp.int32(1), jnp.asarray([3, 2, 1, 0]), jnp.int32(length),
                                           jnp.int32(ring_end))
    for layer, (got, expected) in enumerate(zip(restored.layers, reference.layers)):
        positions, got_positions = np.asarray(expected.positions[1]), np.asarray(got.positions[1])
        if config.is_sliding(layer) and length < ring_end:  # length - window: in no later query's window
            unseen = length - config.sliding_window
            positions, got_positions = (np.where(held == unseen, EMPTY_SLOT, held) for held in (positions, got_positions))
        np.testing.assert_array_equal(got_positions, positions, err_msg=f"layer {layer}")
        held = positions >= 0
        # Layers past the first see other chunkings' rounding (about 1e-7); a wrong entry is off by far more.
        for got_part, expected_part in ((got.keys, expected.keys), (got.values, expected.values)):
            np.testing.assert_allclose(np.asarray(got_part[1])[held], np.asarray(expected_part[1])[held],
                                       rtol=0, atol=1e-5, err_msg=f"layer {layer}")


def test_the_copies_lower_for_cuda_at_gpt_oss_shapes():
    """Restore, save and the slot copy are plain XLA gathers and scatters beside the kernels' cache layout."""
    config = preset("gpt-oss-20b")
    cache = jax.eval_shape(lambda: KVCache.create(config, 64, 4096))
    pool = jax.eval_shape(lambda: prefix_cache.create_pool(config, 256, 128, jnp.bfloat16))
    scalar, rows = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((8,), jnp.int32)
    for function, arguments in ((prefix_cache.restore_prefix, (cache, pool, scalar, rows, scalar, scalar)),
                                (prefix_cache.save_blocks, (cache, pool, rows, rows, rows)),
                                (prefix_cache.copy_rows, (cache, rows, rows))):
        exported = jax.export.export(jax.jit(function), platforms=["cuda"])(*arguments)
        assert exported.platforms == ("cuda",)
        assert jax.tree.map(lambda out: out.shape, exported.out_avals) == jax.tree.map(
            lambda out: out.shape, tuple(jax.tree.leaves(pool if function is prefix_cache.save_blocks else cache)))


@pytest.mark.parametrize("first", [True, False])
def test_a_prefill_call_that_keeps_blocks_lowers_for_cuda_with_the_kernels(first):
    """The engine's prefill call with the pool (rings widened to a window plus the chunk, the
    completed blocks written) at gpt-oss-20b's widths, two layers (a sliding and a full one),
    ``kernels="pallas"``: it lowers for CUDA with a Mosaic GPU call for attention and both
    expert matmuls, and returns the pool and the cache at their shapes."""
    config = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=2)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GptOss(config, kernels="pallas", rngs=nnx.Rngs(0))))
    rows, width = 4, 256
    cache = jax.eval_shape(lambda: KVCache.create(config, 8, 4096))
    pool = jax.eval_shape(lambda: prefix_cache.create_pool(config, 64, 128, jnp.bfloat16))
    vector, chunk = jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows, width), jnp.int32)
    saves_shape = jax.ShapeDtypeStruct((rows * (width // 128 + 1),), jnp.int32)
    saves = BlockSaves(saves_shape, saves_shape, saves_shape)

    def call(state, cache, slots, tokens, positions, last_index, pool, saves):
        return prefill_chunk(graphdef, state, cache, slots, tokens, positions, last_index, pool, saves, first=first)

    exported = jax.export.export(jax.jit(call), platforms=["cuda"])(state, cache, vector, chunk, chunk, vector,
                                                                      pool, saves)
    assert len(re.findall(r"stablehlo\.custom_call @mosaic_gpu", exported.mlir_module())) >= 3
    pool_leaves = len(jax.tree.leaves(pool))
    cache_out, pool_out = exported.out_avals[1:-pool_leaves], exported.out_avals[-pool_leaves:]
    assert [out.shape for out in cache_out] == [leaf.shape for leaf in jax.tree.leaves(cache)]
    assert [out.shape for out in pool_out] == [leaf.shape for leaf in jax.tree.leaves(pool)]


def test_bad_prefix_settings_are_refused_with_the_reason(model):
    with pytest.raises(EngineSizeError, match="prefix_block must be a multiple of the sliding window"):
        _engine(model, prefix_block=20)
    with pytest.raises(EngineSizeError, match="holds no block"):
        _engine(model, prefix_cache_bytes=10)
    with pytest.raises(EngineSizeError, match="prefill_budget must hold a chunk"):
        _engine(model, prefill_budget=8)
    with _engine(model, prefix_caching=False) as engine:
        assert engine.prefix_index is None


def test_on_a_mesh_of_8_devices_an_agent_loop_gets_its_single_device_tokens(uncached):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    expected = _agent_loop(uncached, SETTINGS["greedy"], rounds=3, seed=20)
    assert [tokens for tokens, _ in got] == [tokens for tokens, *_ in expected]
    assert got[0][1] == 0 and all(cached_tokens > 0 for _, cached_tokens in got[1:])


def _mesh_worker() -> None:
    """An agent loop on a data=2,expert=2,tensor=2 mesh with the prefix cache; print (tokens, cached) as JSON."""
    from gptoss_jax.sharding import make_mesh

    with _engine(_model(make_mesh("data=2,expert=2,tensor=2"))) as engine:
        outcomes = _agent_loop(engine, SETTINGS["greedy"], rounds=3, seed=20)
    print(json.dumps([(tokens, cached_tokens) for tokens, _, cached_tokens in outcomes]))


if __name__ == "__main__":
    _mesh_worker()
