"""Structured output's costs: the grammar mask per step at o200k's 201,088 tokens, and what one
constrained row does to the decode speed of the unconstrained rows beside it.

- mask: a Harmony reply grammar with a JSON schema answer (what ``response_format`` builds),
  walked along a valid reply token by token; the time of each step's mask (llguidance writing
  the ``uint32 [vocab / 32]`` row), p50 and p99.
- decode: the demo model on this machine, 15 unconstrained rows beside a 16th that is
  unconstrained too, or constrained and writing its analysis (free text: multi-step bursts
  under one mask), or constrained and writing its JSON answer (a long string; no reasoning,
  ``thinking_token_budget=0``: multi-step bursts that call the host back after every step for
  the row's next mask); tokens/s of the 15, from their submission to their end. The 16th is
  decoding before the 15 are submitted, so all kinds are admitted alike.

Usage::

    python -m benchmarks.throughput.structured --tokens 64 --runs 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["city", "days", "tags"],
    "properties": {"city": {"type": "string", "maxLength": 40}, "days": {"type": "integer", "minimum": 1},
                   "tags": {"type": "array", "items": {"enum": ["rain", "sun", "wind"]}, "maxItems": 5}},
}
LONG_STRING = {"type": "object", "required": ["text"], "additionalProperties": False,
               "properties": {"text": {"type": "string"}}}
REPLY = ("<|channel|>analysis<|message|>The user wants a forecast for Paris; answer in the schema.<|end|>"
         '<|start|>assistant<|channel|>final<|message|>{"city": "Paris", "days": 3, "tags": ["rain", "sun"]}'
         "<|return|>")


def mask_times(repeats: int) -> np.ndarray:
    """Seconds per mask along :data:`REPLY` under the schema's reply grammar, ``repeats`` walks."""
    from gptoss_jax.engine.constraints import RowSteering, compile_grammar, mask_words
    from gptoss_jax.harmony.grammar import AnswerGrammar, reply_grammar
    from gptoss_jax.tokenizer import o200k_harmony_tokenizer

    tokenizer = o200k_harmony_tokenizer()
    tokens = tokenizer.encode(REPLY, allowed_special="all")
    grammar = reply_grammar(AnswerGrammar(json_schema=SCHEMA))
    mask = np.zeros(mask_words(tokenizer.vocab_size), np.uint32)
    times = []
    for _ in range(repeats):
        steering = RowSteering(tokenizer, compile_grammar(tokenizer, grammar), None)
        for token in tokens:
            start = time.perf_counter()
            steering.fill_mask(mask)
            times.append(time.perf_counter() - start)
            steering.accept(token)
    return np.asarray(times)


NEIGHBOURS = {
    "an unconstrained row": {},
    "a constrained row in its analysis": dict(json_schema=SCHEMA),
    "a constrained row in its JSON": dict(json_schema=LONG_STRING, thinking_token_budget=0),
}


def decode_rates(max_tokens: int, runs: int) -> dict[str, tuple[float, float]]:
    """Tokens/s of 15 unconstrained rows beside each of :data:`NEIGHBOURS`, and its ratio to the
    rate beside an unconstrained row: medians over ``runs`` rounds, each round running every kind
    in turn, so that a busy spell of a shared machine touches them alike."""
    import jax.numpy as jnp

    import gptoss_jax
    from gptoss_jax.demo import ensure_demo_checkpoint
    from gptoss_jax.engine import Engine, SamplingParams
    from gptoss_jax.harmony import Message, Role, encode_for_completion
    from gptoss_jax.tokenizer import Tokenizer

    folder = ensure_demo_checkpoint()
    tokenizer = Tokenizer.from_pretrained_dir(folder)
    engine = Engine(gptoss_jax.load(folder, dtype=jnp.float32), max_batch=16, max_context=1024, prefill_chunk=64,
                    tokenizer=tokenizer)
    prompt = encode_for_completion([Message(Role.USER, "Forecast for Paris?")], tokenizer)

    def run(neighbour: dict) -> float:
        other = engine.submit(prompt, SamplingParams(max_tokens=4 * max_tokens, seed=99, **neighbour))
        next(iter(other))  # decoding before the 15 come, whatever its kind (a grammar takes a while to compile)
        start = time.perf_counter()
        free = [engine.submit(prompt, SamplingParams(max_tokens=max_tokens, seed=seed)) for seed in range(15)]
        made = sum(len(handle.result().tokens) for handle in free)
        seconds = time.perf_counter() - start
        other.cancel()
        other.result()
        return made / seconds

    try:
        for neighbour in NEIGHBOURS.values():  # compile every program first
            run(neighbour)
        rates = {name: [] for name in NEIGHBOURS}
        for _ in range(runs):
            for name, neighbour in NEIGHBOURS.items():
                rates[name].append(run(neighbour))
        baseline = np.asarray(rates["an unconstrained row"])
        return {name: (float(np.median(values)), float(np.median(np.asarray(values) / baseline)))
                for name, values in rates.items()}
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20,
                        help="walks of the reply for the mask times (0: no mask times, so no o200k vocabulary needed)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per unconstrained row in the decode runs")
    parser.add_argument("--runs", type=int, default=5, help="decode runs of each kind (the median is reported)")
    args = parser.parse_args(argv)
    if args.repeats > 0:
        times = mask_times(args.repeats) * 1e3
        print(f"mask per step at o200k (201,088 tokens), {times.size} steps: p50 {np.percentile(times, 50):.3f} ms, "
              f"p99 {np.percentile(times, 99):.3f} ms, max {times.max():.3f} ms")
    for name, (rate, ratio) in decode_rates(args.tokens, args.runs).items():
        print(f"decode, demo model: 15 unconstrained rows beside {name}: {rate:.1f} tok/s ({ratio:.0%} of the rate "
              f"beside an unconstrained row, median of the rounds' ratios)")


if __name__ == "__main__":
    main()
