"""The engine under real traffic: batched prefill, the prefix cache and prompts computed once.

Workloads a, b and c of ``python -m benchmarks.throughput.engine --traffic`` (see :mod:`benchmarks.throughput.engine`).
A workload is conversations that start together; a conversation's rounds run one after another,
round k + 1's prompt being round k's prompt, its reply and the round's appended tokens (a tool
result). Each workload runs on an engine with the prefix cache, one without, and one request at a
time (on the engine without). First the workload runs once in each mode on a throwaway engine,
which compiles its programs (jax keeps them for the later engines); then the engine with the cache runs a
warm-up pass of the same shapes with other tokens (so its pool holds other prompts, none of the
timed ones) before its timed pass. The compile time left in a timed pass is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from gptoss_jax.engine import Engine

ROUND_SETTINGS = dict(temperature=0)
MODES = {"on": ("cache on", True, True), "off": ("cache off", False, True), "alone": ("one at a time", False, False)}
"""``--modes`` name -> (the mode's name in the figures, prefix caching, conversations at once)."""


@dataclasses.dataclass(frozen=True)
class Conversation:
    first_prompt: list[int]
    new_tokens: list[int]  # per round
    appended: list[list[int]]  # after each round but the last: the tool result


@dataclasses.dataclass(frozen=True)
class Record:
    conversation: int
    round: int
    prompt_tokens: int
    cached_tokens: int
    ttft: float
    token_times: list[float]  # seconds from the run's start


def make_workload(name: str, vocab: int, seed: int, scale: float) -> list[Conversation]:
    """The conversations of workload a, b or c (prompt lengths times ``scale``)."""
    rng = np.random.default_rng(seed)

    def tokens(count: float) -> list[int]:
        return rng.integers(0, vocab, max(1, int(count * scale))).tolist()

    if name == "a":
        return [Conversation(tokens(rng.integers(70, 91)), [int(rng.integers(8, 65))], []) for _ in range(16)]
    if name == "b":
        tools = [token for _ in range(8) for token in tokens(rng.integers(80, 121))]
        shared = tools + tokens(1500)
        return [Conversation(shared + tokens(rng.integers(60, 141)), [int(rng.integers(16, 49)) for _ in range(6)],
                             [tokens(rng.integers(40, 161)) for _ in range(5)]) for _ in range(8)]
    if name == "c":
        system = tokens(1000)
        return [Conversation(system + tokens(rng.integers(20, 101)), [int(rng.integers(8, 65))], [])
                for _ in range(16)]
    raise ValueError(f"unknown workload {name!r}")


def _run_conversation(engine: Engine, index: int, conversation: Conversation, start: float,
                      records: list[Record]) -> None:
    prompt = list(conversation.first_prompt)
    for round_index, new_tokens in enumerate(conversation.new_tokens):
        result = engine.submit(prompt, max_tokens=new_tokens, **ROUND_SETTINGS).result()
        records.append(Record(index, round_index, len(prompt), result.cached_tokens, result.time_to_first_token,
                              [t - start for t in result.token_times]))
        if round_index < len(conversation.appended):
            prompt += result.tokens + conversation.appended[round_index]


def run(engine: Engine, workload: Sequence[Conversation], together: bool) -> tuple[list[Record], dict[str, float]]:
    """The conversations at once (each in its thread) or one after another; returns the records and the
    engine's prompt-token and compile counters over the run."""
    records: list[Record] = []
    before = (engine.prompt_tokens, engine.cached_prompt_tokens, engine.compile_seconds)
    start = time.perf_counter()
    if together:
        threads = [threading.Thread(target=_run_conversation, args=(engine, index, conversation, start, records))
                   for index, conversation in enumerate(workload)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for index, conversation in enumerate(workload):
            _run_conversation(engine, index, conversation, start, records)
    sent = engine.prompt_tokens - before[0]
    counters = dict(prompt_tokens_sent=sent, prompt_tokens_computed=sent - (engine.cached_prompt_tokens - before[1]),
                    compile_seconds=engine.compile_seconds - before[2])
    return records, counters


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(records: Sequence[Record], counters: dict[str, float]) -> dict[str, float]:
    tokens = sum(len(record.token_times) for record in records)
    span = max(record.token_times[-1] for record in records)
    ttfts = [record.ttft for record in records]
    later = [record.ttft for record in records if record.round > 0]
    figures = dict(output_tokens=tokens, seconds=span, output_tokens_per_second=tokens / span,
                   ttft_p50=_percentile(ttfts, 50), ttft_p99=_percentile(ttfts, 99), **counters)
    figures["computed_share"] = counters["prompt_tokens_computed"] / counters["prompt_tokens_sent"]
    if later:
        figures.update(later_ttft_p50=_percentile(later, 50), later_ttft_p99=_percentile(later, 99))
    return figures


def run_traffic(model, args: argparse.Namespace) -> dict[str, Any]:
    """Every workload of ``args.traffic`` in the three modes; prints a table and returns the figures."""
    vocab = model.config.vocab_size
    device = jax.devices()[0].device_kind
    results: dict[str, Any] = dict(model=args.model, device=device, workloads={})
    for name in args.traffic:
        workload = make_workload(name, vocab, args.seed, args.scale)
        warm_up = make_workload(name, vocab, args.seed + 1000, args.scale)
        longest = max(len(c.first_prompt) + sum(map(len, c.appended)) + sum(c.new_tokens) for c in workload)
        context = min(1 << (longest - 1).bit_length(), model.config.max_position_embeddings)
        options = dict(max_batch=args.max_batch or len(workload), max_context=context,
                       prefill_chunk=args.prefill_chunk, prefill_budget=args.prefill_budget,
                       burst_steps=args.burst_steps, burst_steps_busy=args.burst_steps_busy)
        print(f"workload {name}: {len(workload)} conversations x {len(workload[0].new_tokens)} rounds, "
              f"{options['max_batch']} slots x {context}, budget {args.prefill_budget} on {device}", flush=True)
        modes = [MODES[name] for name in MODES if name in args.modes]
        for _, caching, together in modes:  # compiles what the runs need (jax keeps it)
            with Engine(model, prefix_caching=caching, **options) as engine:
                run(engine, workload, together)
        figures = {}
        for mode, caching, together in modes:
            with Engine(model, prefix_caching=caching, **options) as engine:
                if caching:  # a cache holding other prompts, as a server's would
                    run(engine, warm_up, together)
                records, counters = run(engine, workload, together)
                figures[mode] = summarize(records, counters)
                figures[mode].update(programs=engine.programs, copy_programs=engine.copy_programs)
            row = figures[mode]
            later = (f"  later rounds TTFT p50 {row['later_ttft_p50']:.3f} p99 {row['later_ttft_p99']:.3f} s"
                     if "later_ttft_p50" in row else "")
            print(f"  {mode:>13}: {row['output_tokens_per_second']:7.1f} output tok/s  TTFT p50 {row['ttft_p50']:.3f} "
                  f"p99 {row['ttft_p99']:.3f} s{later}  prompt tokens computed {row['prompt_tokens_computed']} of "
                  f"{row['prompt_tokens_sent']} ({row['computed_share']:.0%})  compile {row['compile_seconds']:.1f} s, "
                  f"{row['programs']} model programs",
                  flush=True)
        ratios = {}
        if len(figures) == len(MODES):
            on, off, alone = (figures[mode] for mode, _, _ in MODES.values())
            ratios = dict(throughput_over_one_at_a_time=on["output_tokens_per_second"]
                          / alone["output_tokens_per_second"], ttft_p50_off_over_on=off["ttft_p50"] / on["ttft_p50"])
            if "later_ttft_p50" in on:
                ratios["later_ttft_p50_off_over_on"] = off["later_ttft_p50"] / on["later_ttft_p50"]
            print("  " + ", ".join(f"{key} {value:.2f}x" for key, value in ratios.items()), flush=True)
        results["workloads"][name] = dict(modes=figures, **ratios)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results
