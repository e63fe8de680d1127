"""generate: cache consistency, sampling, streaming, log-probabilities, bad input."""

import importlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.compiled import CompiledByShape
from gptoss_jax.config import preset
from gptoss_jax.generate import GenerationInputError, generate
from gptoss_jax.kv_cache import KVCache
from gptoss_jax.model import GptOss
from gptoss_jax.sampling import SamplingConfig, sample

generate_module = importlib.import_module("gptoss_jax.generate")  # the package exports the function
NEW_TOKENS = 12
PREFILL_CHUNK = 16  # generate's smallest chunk


@pytest.fixture(scope="module")
def model():
    return GptOss(preset("tiny"), dtype=jnp.float32, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    # Lengths differ; two span several prefill chunks, and each passes the 8-slot ring.
    return [rng.integers(0, 512, n).tolist() for n in (21, 35, 9)]


@nnx.jit
def full_forward(model, tokens):
    return model(tokens)


def greedy_by_full_forward(model, prompt, steps):
    """The argmax continuation, recomputing the whole sequence without a cache at every step.

    The sequence sits in a fixed-size buffer (one compilation); causal attention keeps the
    zeros after it from changing any logit up to its end.
    """
    buffer = np.zeros((1, len(prompt) + steps), np.int32)
    buffer[0, :len(prompt)] = prompt
    for end in range(len(prompt), len(prompt) + steps):
        buffer[0, end] = int(jnp.argmax(full_forward(model, jnp.asarray(buffer))[0, end - 1]))
    return buffer[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def greedy_output(model, prompts):
    return generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0, prefill_chunk_size=PREFILL_CHUNK,
                    return_logprobs=True)


def test_cached_greedy_equals_full_recomputation(model, prompts, greedy_output):
    assert len(prompts[1]) > 2 * PREFILL_CHUNK and len(prompts[2]) + NEW_TOKENS > 2 * model.config.sliding_window
    for prompt, tokens in zip(prompts, greedy_output.tokens):
        assert tokens == greedy_by_full_forward(model, prompt, NEW_TOKENS)


def test_logprobs_are_those_of_the_full_forward(model, prompts, greedy_output):
    prompt, tokens = prompts[0], greedy_output.tokens[0]
    logits = full_forward(model, jnp.asarray([prompt + tokens]))[0, len(prompt) - 1:-1]
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(tokens)[:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(greedy_output.logprobs[0], np.asarray(expected), atol=1e-5)


def test_stats_count_tokens(prompts, greedy_output):
    stats = greedy_output.stats
    assert stats.prefill_tokens == sum(map(len, prompts))
    assert stats.decode_tokens == NEW_TOKENS * len(prompts)
    assert stats.decode_tokens_per_second > 0 and stats.prefill_tokens_per_second > 0


def test_stop_token_ends_a_row_and_is_kept(model, prompts, greedy_output):
    stop = greedy_output.tokens[0][3]
    out = generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0, stop_tokens=[stop])
    for full, stopped in zip(greedy_output.tokens, out.tokens):
        expected = full[:full.index(stop) + 1] if stop in full else full
        assert stopped == expected


def test_streamer_sees_every_token_in_order(model, prompts, greedy_output):
    steps = []
    out = generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0,
                   streamer=lambda tokens, active: steps.append((tokens.tolist(), active.tolist())))
    assert out.tokens == greedy_output.tokens
    assert [tokens for tokens, _ in steps] == np.array(out.tokens).T.tolist()
    assert all(all(active) for _, active in steps)


def test_streamer_marks_rows_inactive_after_their_stop_token(model, prompts, greedy_output):
    # Row 0 stops at its 4th token; the others go on.
    stop = greedy_output.tokens[0][3]
    steps = []
    out = generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0, stop_tokens=[stop],
                   streamer=lambda tokens, active: steps.append((tokens.tolist(), active.tolist())))
    assert len(steps) == max(map(len, out.tokens))
    for row, row_tokens in enumerate(out.tokens):
        assert [active[row] for _, active in steps] == [step < len(row_tokens) for step in range(len(steps))]
        assert [tokens[row] for tokens, _ in steps[:len(row_tokens)]] == row_tokens


def test_streamer_stops_generation_after_the_step_it_returns_true(model, prompts, greedy_output):
    def run(stop_after: int):
        calls = []

        def streamer(tokens, active) -> bool:
            calls.append(tokens.tolist())
            return len(calls) == stop_after + 1

        out = generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0, streamer=streamer)
        assert len(calls) == stop_after + 1
        return out

    for stop_after in (0, 4):
        out = run(stop_after)
        assert out.tokens == [tokens[:stop_after + 1] for tokens in greedy_output.tokens]
        assert out.stats.decode_tokens == (stop_after + 1) * len(prompts)
    assert out.stats.compile_seconds == 0  # the stop is a value in the loop, not a new program


def test_each_token_after_the_first_costs_one_forward(model, prompts, greedy_output, monkeypatch):
    """The first token comes from the prefill's logits; the last sampled one is never fed back."""
    decode_forwards = []
    with_cache = GptOss.with_cache

    def counted(self, tokens, *args, **kwargs):
        if tokens.shape[1] == 1:  # prefill chunks are at least 16 tokens
            jax.debug.callback(lambda: decode_forwards.append(1))
        return with_cache(self, tokens, *args, **kwargs)

    monkeypatch.setattr(GptOss, "with_cache", counted)
    # Compile afresh: the shared executables were traced without the count.
    generator = generate_module.Generator()
    stop = greedy_output.tokens[0][0]
    for max_new_tokens, stop_tokens, expected_tokens in ((1, (), 1), (5, (), 5), (5, [stop], 1)):
        decode_forwards.clear()
        out = generate(model, prompts[:1], max_new_tokens=max_new_tokens, temperature=0, stop_tokens=stop_tokens,
                       generator=generator)
        jax.effects_barrier()
        assert len(out.tokens[0]) == expected_tokens
        assert len(decode_forwards) == expected_tokens - 1


def test_a_generation_that_fills_the_cache_goes_on_in_a_doubled_one(model, prompts, monkeypatch):
    """A cache smaller than the generation needs: the loop stops when it is full, the cache grows
    (64 -> 128 slots here) and decoding goes on with the same tokens and log-probabilities."""
    options = dict(max_new_tokens=60, temperature=0, return_logprobs=True)
    whole = generate(model, prompts, **options)  # one cache for prompt + 60 tokens
    extensions = []
    extended = KVCache.extended

    def recorded(self, config, max_length):
        extensions.append((self.max_length, max_length))
        return extended(self, config, max_length)

    monkeypatch.setattr(KVCache, "extended", recorded)
    monkeypatch.setattr(generate_module, "_MIN_CACHE", 16)
    monkeypatch.setattr(generate_module, "FIRST_CACHE_LENGTH", 8)
    grown = generate(model, prompts, **options)
    assert extensions == [(64, 128)]  # the longest prompt (35) + 8, bucketed; then what 35 + 60 needs
    assert grown.tokens == whole.tokens
    # Streamed: the loop that stops for the cache to grow hands each token over once, in order.
    streamed = []
    grown_streaming = generate(model, prompts, **options, streamer=lambda tokens, active: streamed.append(tokens))
    assert grown_streaming.tokens == whole.tokens and np.array(streamed).T.tolist() == whole.tokens
    np.testing.assert_allclose(np.concatenate(grown.logprobs), np.concatenate(whole.logprobs), atol=1e-5)


def test_same_seed_same_tokens(model, prompts):
    def run(seed):
        return generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=seed).tokens

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_zero_new_tokens_runs_nothing(model, prompts):
    out = generate(model, prompts, max_new_tokens=0)
    assert out.tokens == [[], [], []]
    assert out.stats.prefill_tokens == out.stats.decode_tokens == 0


def test_top_k_and_top_p_stay_in_their_sets():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 50)) * 3, jnp.float32)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    probabilities = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probabilities, axis=-1)
    mass_before = np.cumsum(np.take_along_axis(probabilities, order, -1), -1) - np.take_along_axis(probabilities, order, -1)
    nucleus = [set(order[row][mass_before[row] < 0.6]) for row in range(4)]
    seen_k, seen_p = [set() for _ in range(4)], [set() for _ in range(4)]
    for step in range(200):
        key = jax.random.key(step)
        for row, token in enumerate(np.asarray(sample(logits, key, SamplingConfig(temperature=2.0, top_k=3)))):
            seen_k[row].add(token)
        for row, token in enumerate(np.asarray(sample(logits, key, SamplingConfig(temperature=1.0, top_p=0.6)))):
            seen_p[row].add(token)
    for row in range(4):
        assert seen_k[row] <= set(top3[row]) and len(seen_k[row]) > 1
        assert seen_p[row] <= nucleus[row]


def test_temperature_zero_is_greedy():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((3, 20)), jnp.float32)
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), SamplingConfig(temperature=0)),
                                  np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize(
    "prompts_, kwargs, error, message",
    [
        # The CLI reports GenerationInputError as one line; any other ValueError keeps its traceback.
        ([[]], {}, GenerationInputError, "prompt 0 is empty"),
        ([], {}, GenerationInputError, "no prompts"),
        ([[1, 2]], {"max_new_tokens": -1}, GenerationInputError, "max_new_tokens must be an integer >= 0"),
        ([[1, 512]], {}, GenerationInputError, "outside the vocabulary"),
        ([[1] * 131072], {"max_new_tokens": 1}, GenerationInputError, "exceeds the model's context of 131072"),
        ([[1]], {"prefill_chunk_size": 0}, GenerationInputError, "prefill_chunk_size must be >= 1"),
        ([[1]], {"top_p": 1.5}, ValueError, "top_p must be in"),
        ([[1]], {"temperature": -1.0}, ValueError, "temperature must be >= 0"),
        ([[1]], {"top_k": 0}, ValueError, "top_k must be >= 1"),
        ([1, 2, 3], {}, GenerationInputError, r"wrap one prompt in a list, e.g. \[\[1, 2, 3\]\]"),
        ([[[1, 2]]], {}, GenerationInputError, r"prompt 0 must be a flat sequence of token ids, got shape \(1, 2\)"),
        ([[1.0, 2.0]], {}, GenerationInputError, "prompt 0 must hold integer token ids, got float64"),
    ],
)
def test_bad_input_is_a_clear_error(model, prompts_, kwargs, error, message):
    with pytest.raises(error, match=message):
        generate(model, prompts_, **kwargs)


def test_a_string_is_not_a_prompt_list(model):
    with pytest.raises(TypeError, match="sequence of token-id sequences"):
        generate(model, "hello")


def test_prompts_may_be_a_jax_or_numpy_array(model, prompts, greedy_output):
    same_length = [prompt[:9] for prompt in prompts]
    expected = generate(model, same_length, max_new_tokens=3, temperature=0).tokens
    for array in (jnp.asarray(same_length), np.asarray(same_length)):
        assert generate(model, array, max_new_tokens=3, temperature=0).tokens == expected


def test_what_the_streamer_raises_comes_out_as_it_was_and_stops_generation(model, prompts):
    calls = []

    class Disconnected(Exception):
        pass

    def streamer(tokens, active):
        calls.append(tokens)
        if len(calls) == 3:
            raise Disconnected("the client went away")

    with pytest.raises(Disconnected, match="the client went away"):
        generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0, streamer=streamer)
    assert len(calls) == 3  # the loop stopped at that step
    with pytest.raises(TypeError, match="streamer must be a callable"):
        generate(model, prompts, max_new_tokens=2, streamer=object())
    # The next call is not affected by the failed one.
    assert len(generate(model, prompts[:1], max_new_tokens=2, temperature=0, streamer=lambda *_: None).tokens[0]) == 2


def test_new_temperature_or_top_p_values_reuse_the_compiled_loop(model, prompts, greedy_output):
    first = generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.7, top_p=0.9)
    assert first.tokens != greedy_output.tokens
    for temperature, top_p in ((1.3, 0.9), (1e-3, 0.5)):
        out = generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=temperature, top_p=top_p)
        assert out.stats.compile_seconds == 0
    assert out.tokens == greedy_output.tokens  # the new values took effect: nearly greedy now


def test_decoded_experts_change_nothing_but_speed(prompts, greedy_output):
    model = GptOss(preset("tiny"), dtype=jnp.float32, rngs=nnx.Rngs(0))  # the fixture's weights
    tokens = jnp.asarray([prompts[1]])
    packed_logits = np.asarray(full_forward(model, tokens))
    model.decode_experts()
    assert model.block[0].mlp.mlp1_weight.decoded[...].shape == (4, 192, 64)
    np.testing.assert_array_equal(np.asarray(full_forward(model, tokens)), packed_logits)
    # The XLA path reads the decoded copy, not the packed bytes: wiping those changes nothing.
    for block in model.block:
        for weight in (block.mlp.mlp1_weight, block.mlp.mlp2_weight):
            weight.blocks[...] = jnp.zeros_like(weight.blocks[...])
    np.testing.assert_array_equal(np.asarray(full_forward(model, tokens)), packed_logits)
    out = generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0, prefill_chunk_size=PREFILL_CHUNK)
    assert out.tokens == greedy_output.tokens


def test_compiled_programs_are_keyed_by_model_structure_not_by_graphdef_object(model):
    compiled = CompiledByShape(lambda graphdef, x: x, donate=(), static=())
    graphdef, _ = nnx.split(model)
    same_structure, _ = nnx.split(model)
    other = GptOss(preset("tiny"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # same shapes, another dtype
    other_graphdef, _ = nnx.split(other)
    assert same_structure is not graphdef
    assert compiled._graphdef_index(graphdef) == compiled._graphdef_index(same_structure) == 0
    assert compiled._graphdef_index(other_graphdef) == 1
    assert compiled._graphdef_index(graphdef) == 0


def test_generations_streaming_from_two_threads_at_once_each_get_their_own_tokens(model, prompts, greedy_output):
    """Both calls share the compiled loop; each streamer must see only its own call's steps."""
    barrier = threading.Barrier(2, timeout=60)
    seen = {0: [], 1: []}
    outputs = {}

    def run(index):
        def streamer(tokens, active):
            if not seen[index]:
                barrier.wait()  # both loops are running before either goes on
            seen[index].append(tokens.copy())

        outputs[index] = generate(model, [prompts[index]], max_new_tokens=NEW_TOKENS, temperature=0,
                                  prefill_chunk_size=PREFILL_CHUNK, streamer=streamer)

    threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    for index in (0, 1):
        assert outputs[index].tokens == [greedy_output.tokens[index]]
        assert [int(step[0]) for step in seen[index]] == greedy_output.tokens[index]
