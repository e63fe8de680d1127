"""Structured output in the engine: grammars enforced while decoding, and the reasoning budget.

The demo model's weights are random, so a reply is valid only because the constraint holds.
Every seed of every schema runs in one engine run (the engine batches them), to share its
compiled programs and keep the file quick. The mask itself is checked against a brute force on
o200k, the real vocabulary.
"""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.demo import ensure_demo_checkpoint
from gptoss_jax.engine import Engine, RequestError, SamplingParams
from gptoss_jax.engine.constraints import burst_steps, compile_grammar, mask_words, steering_for
from gptoss_jax.harmony import Message, Role, encode_for_completion, parse_completion, stop_token_ids
from gptoss_jax.harmony.grammar import json_schema_expression
from gptoss_jax.tokenizer import Tokenizer, o200k_harmony_tokenizer

SEEDS = 20
BUDGET = 6

SCHEMAS = {
    "nested objects, enum, integer bounds": {
        "type": "object", "additionalProperties": False, "required": ["user", "level"],
        "properties": {
            "user": {"type": "object", "additionalProperties": False, "required": ["id", "role"],
                     "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                    "role": {"enum": ["admin", "guest"]}}},
            "level": {"type": "integer", "minimum": -5, "maximum": 5},
        },
    },
    "arrays with minItems/maxItems, anyOf with const": {
        "type": "object", "additionalProperties": False, "required": ["items", "mode"],
        "properties": {
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "boolean"}},
            "mode": {"anyOf": [{"const": "fast"}, {"const": 7}]},
        },
    },
    "strings with maxLength and pattern": {
        "type": "object", "additionalProperties": False, "required": ["code", "note"],
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                       "note": {"type": "string", "maxLength": 6}},
    },
}


@pytest.fixture(scope="module")
def demo():
    folder = ensure_demo_checkpoint()
    tokenizer = Tokenizer.from_pretrained_dir(folder)
    engine = Engine(gptoss_jax.load(folder, dtype=jnp.float32), max_batch=16, max_context=512, prefill_chunk=64,
                    tokenizer=tokenizer)
    prompt = encode_for_completion([Message(Role.USER, "Answer in JSON.")], tokenizer)
    yield engine, tokenizer, prompt
    engine.close()


def _params(tokenizer: Tokenizer, **settings) -> SamplingParams:
    return SamplingParams(stop_token_ids=tuple(stop_token_ids(tokenizer)), **settings)


def test_every_seed_of_every_schema_ends_with_stop_and_validates(demo):
    engine, tokenizer, prompt = demo
    neighbours = [_params(tokenizer, max_tokens=24, seed=seed) for seed in (101, 102)]
    solo = [engine.submit(prompt, params).result().tokens for params in neighbours]
    handles = {(name, seed): engine.submit(prompt, _params(tokenizer, max_tokens=400, seed=seed, json_schema=schema,
                                                             thinking_token_budget=BUDGET))
               for name, schema in SCHEMAS.items() for seed in range(SEEDS)}
    beside = [engine.submit(prompt, params) for params in neighbours]
    for (name, seed), handle in handles.items():
        result = handle.result()
        assert result.finish_reason == "stop", (name, seed, tokenizer.decode(result.tokens))
        final = [m for m in parse_completion(result.tokens, tokenizer, strict=False) if m.channel == "final"]
        assert len(final) == 1, (name, seed, tokenizer.decode(result.tokens))
        jsonschema.validate(json.loads(final[0].content), SCHEMAS[name])
    # A constrained neighbour changes no token of the unconstrained rows beside it.
    assert [handle.result().tokens for handle in beside] == solo


def test_a_row_steered_token_by_token_keeps_multi_step_bursts_and_its_tokens(demo):
    # With no reasoning allowed, every token of the reply is steered by its last one. The engine
    # steers it within multi-step bursts (the host called back after each step), which must give
    # exactly the tokens that one-step bursts give (each row's draw depends on its own key, step
    # and mask only), so its unconstrained neighbours keep their bursts for nothing.
    engine, tokenizer, prompt = demo
    schema = {"type": "object", "additionalProperties": False, "required": ["text"],
              "properties": {"text": {"type": "string", "maxLength": 80}}}
    requests = [_params(tokenizer, max_tokens=40, seed=7, json_schema=schema, thinking_token_budget=0),
                _params(tokenizer, max_tokens=40, seed=8)]

    def run() -> list[list[list[int]]]:
        handles = [engine.submit(prompt, params) for params in requests]
        return [[delta.tokens for delta in handle] for handle in handles]

    within_bursts = run()
    steps = engine.burst_steps, engine.burst_steps_busy
    engine.burst_steps = engine.burst_steps_busy = 1
    try:
        one_step = run()
    finally:
        engine.burst_steps, engine.burst_steps_busy = steps
    assert [sum(deltas, []) for deltas in within_bursts] == [sum(deltas, []) for deltas in one_step]
    assert max(len(tokens) for tokens in within_bursts[0]) > 1
    assert max(len(tokens) for tokens in one_step[0]) == 1


OPEN_FINAL = "<|channel|>final<|message|>"
CLOSINGS = ("<|end|><|start|>assistant" + OPEN_FINAL, "<|start|>assistant" + OPEN_FINAL, OPEN_FINAL,
            "<|message|><|end|><|start|>assistant" + OPEN_FINAL)


@pytest.mark.parametrize("budget", [0, 5, 17])
def test_the_thinking_budget_bounds_what_comes_before_the_final_channel(demo, budget):
    engine, tokenizer, prompt = demo
    results = [engine.submit(prompt, _params(tokenizer, max_tokens=60, seed=seed, thinking_token_budget=budget))
               .result() for seed in range(3)]
    for result in results:
        before, after = tokenizer.decode(result.tokens[:budget]), tokenizer.decode(result.tokens[budget:])
        assert OPEN_FINAL not in before
        assert after.startswith(CLOSINGS), after
        assert result.completion_tokens == 60 and result.finish_reason == "length"  # forced tokens count


def test_a_regex_constrains_a_raw_completion(demo):
    engine, tokenizer, _ = demo
    pattern = r"(yes|no), [0-9]{2,4}"
    for seed in range(4):
        result = engine.submit(tokenizer.encode("Reply:"), _params(tokenizer, max_tokens=40, seed=seed, regex=pattern,
                                                                    harmony_frame=False)).result()
        assert result.finish_reason == "stop"
        assert re.fullmatch(pattern, tokenizer.decode(result.tokens[:-1])), tokenizer.decode(result.tokens)


@pytest.mark.parametrize("settings, fragment", [
    (dict(json_schema={"type": "string", "pattern": "(("}), "json_schema"),
    (dict(json_schema={"type": "wizard"}), "json_schema"),
    (dict(json_schema=[1, 2]), "json_schema"),
    (dict(regex="[a-"), "regex"),
    (dict(grammar="start: undefined_rule"), "grammar"),
    (dict(json_schema={"type": "object"}, regex="a"), "at most one"),
    (dict(thinking_token_budget=-1), "thinking_token_budget"),
])
def test_bad_constraints_are_refused_at_submit(demo, settings, fragment):
    engine, tokenizer, prompt = demo
    with pytest.raises(RequestError, match=re.escape(fragment)):
        engine.submit(prompt, _params(tokenizer, max_tokens=4, **settings))


def _json_prefix_continues(text: str) -> bool:
    """Whether ``text`` begins a value of ``{"ok": true|false}`` with JSON's whitespace between
    tokens (at most 12 characters a gap, as the server bounds it): an oracle written apart from
    the grammar engine."""
    pieces = ["{", None, '"ok"', None, ":", None, ("true", "false"), None, "}"]

    def rest_fits(text: str, index: int) -> bool:
        if not text or index == len(pieces):
            return not text
        piece = pieces[index]
        if piece is None:
            spaces = len(text) - len(text.lstrip(" \t\n\r"))
            return any(rest_fits(text[taken:], index + 1) for taken in range(min(spaces, 12) + 1))
        for literal in (piece if isinstance(piece, tuple) else (piece,)):
            if literal.startswith(text) or (text.startswith(literal) and rest_fits(text[len(literal):], index + 1)):
                return True
        return False

    return rest_fits(text, 0)


@pytest.mark.parametrize("forcing", [False, True])
def test_on_o200k_the_mask_allows_exactly_the_tokens_that_continue_valid_json(forcing):
    """Without forcing, exactly the tokens whose bytes continue a valid prefix. With it (as served),
    llguidance allows only the canonical tokenization where the grammar forces the bytes: a
    subset that holds the encoder's own token."""
    tokenizer = o200k_harmony_tokenizer()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    options = "" if forcing else '%llguidance {"no_forcing": true}\n'
    matcher = compile_grammar(tokenizer, f"{options}start: {json_schema_expression(schema)}\n")
    token_bytes = [tokenizer.decode_bytes([token]) for token in range(tokenizer.vocab_size)]
    special = set(tokenizer.special_tokens.values())
    stops = set(stop_token_ids(tokenizer))
    mask = np.zeros(mask_words(tokenizer.vocab_size), np.uint32)
    written = ""
    for step in ['{', '"', 'ok', '":', ' ', 'true', '}']:
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        allowed = set(np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")).tolist())
        expected = {token for token, raw in enumerate(token_bytes) if token not in special and raw
                    and raw.isascii() and _json_prefix_continues(written + raw.decode("ascii"))}
        (token,) = tokenizer.encode(step)
        if forcing:
            assert token in allowed and allowed <= expected, (written, sorted(allowed - expected)[:10])
        else:
            assert allowed == expected, (written, sorted(allowed ^ expected)[:10])
        assert matcher.consume_token(token)
        written += step
    matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    assert set(np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")).tolist()) == stops


def test_a_steered_row_runs_multi_step_bursts_only_through_free_text():
    tokenizer = Tokenizer.from_pretrained_dir(ensure_demo_checkpoint())
    steering = steering_for(SamplingParams(json_schema={"type": "boolean"}), tokenizer)
    end = tokenizer.special_token_id("<|end|>")
    reply = ("<|channel|>analysis<|message|>Some thought<|end|><|start|>assistant<|channel|>final<|message|>"
             "true<|return|>")
    steps = []
    for token in tokenizer.encode(reply, allowed_special="all"):
        steps.append(burst_steps([steering, None], 16))
        assert steering.pause_token == (end if steps[-1] > 1 else None)
        steering.accept(token)
    header = len(tokenizer.encode("<|channel|>analysis<|message|>", allowed_special="all"))
    thought = len(tokenizer.encode("Some thought<|end|>", allowed_special="all"))
    assert steps == [1] * header + [16] * thought + [1] * (len(steps) - header - thought)


def test_free_text_that_is_not_utf8_keeps_the_reply_on_its_grammar():
    # A multi-step burst through the analysis keeps one mask until <|end|>, so a row may write a
    # byte that opens a UTF-8 sequence and then a token that does not finish it. The grammar's
    # text rule matches characters; the reply must still be able to reach its answer, and must
    # not be let to stop before it (as a broken matcher would).
    tokenizer = Tokenizer.from_pretrained_dir(ensure_demo_checkpoint())
    lead_byte = next(token for token in range(tokenizer.vocab_size)
                     if tokenizer.decode_bytes([token]) in (b"\xc3", b"\xe2", b"\xf0"))
    steering = steering_for(SamplingParams(json_schema={"type": "boolean"}), tokenizer)
    encode = lambda text: tokenizer.encode(text, allowed_special="all")  # noqa: E731
    reply = [*encode("<|channel|>analysis<|message|>Some"), lead_byte, *encode("?x"), lead_byte, *encode("<|end|>"),
             *encode("<|start|>assistant<|channel|>final<|message|>true<|return|>")]
    stops = [tokenizer.special_token_id("<|return|>"), tokenizer.special_token_id("<|call|>")]
    mask = np.zeros(mask_words(tokenizer.vocab_size), np.uint32)
    for token in reply:
        steering.fill_mask(mask)
        allowed = lambda t: bool(mask[t // 32] >> np.uint32(t % 32) & 1)  # noqa: E731
        if token not in stops:
            assert not any(allowed(stop) for stop in stops), tokenizer.decode(reply[:reply.index(token)])
        if steering.pause_token is None:
            assert allowed(token), tokenizer.decode([token])
        steering.accept(token)
