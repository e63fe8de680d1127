"""The continuous-batching engine against one-at-a-time and static batching, on one workload.

A workload is N requests with mixed prompt and output lengths (uniform in the given ranges,
greedy, no stop tokens, so each produces exactly its own length), arriving all at once or as a
Poisson process at ``--rate`` requests/s. Side by side in one process, after a warm-up pass of
each that compiles every program the timed pass needs:

* **engine**: every request submitted at its arrival time; each token's time is when the
  engine handed it over (a decode burst hands over several at once).
* **sequential**: ``generate`` on one request at a time, in arrival order, each starting when
  it has arrived and the one before has finished.
* **static**: ``generate`` on all requests at once, started when the last has arrived, for the
  longest output length (each request counts only its own tokens).

``generate`` runs without a streamer (a streamed step costs more), so its token times are
derived: the first token at the end of its prefill, the others evenly over its decode loop.
That favours the baselines' latencies a little.

Reported per mode: output tokens/s (all requests' output tokens over the span from the first
arrival to the last token), time to first token (from arrival) p50/p99 and inter-token latency
(gaps between a request's consecutive tokens, pooled) p50/p99.

``--traffic a b c`` runs instead the real-traffic workloads, each with the prefix cache on, off,
and one request at a time (the engine with the cache off, each request submitted when the one
before has finished), side by side (:mod:`benchmarks.throughput.engine_traffic`):

* **a**: 16 distinct short requests at once (prompts of about 80 tokens, replies of 8 to 64);
* **b**: an agent replay: 8 conversations at once, each 6 rounds; every conversation starts with
  the same 8 tools (long descriptions) and a developer message of about 1.5K tokens, then its own
  task; each round appends the reply and a tool result and resends everything;
* **c**: 16 users at once sharing one system prompt of about 1K tokens.

Reported per workload and mode: output tokens/s, time to first token p50/p99 at the engine's
API (from submit to the first token id; for b also over the rounds after the first), and prompt
tokens computed against prompt tokens sent.

Usage (from the repository root)::

    python -m benchmarks.throughput.engine                                   # demo model, CPU, 16 requests
    python -m benchmarks.throughput.engine --rate 4                          # Poisson arrivals
    python -m benchmarks.throughput.engine --traffic a b c                   # batched prefill and the prefix cache
    python -m benchmarks.throughput.engine --model gpt-oss-20b --requests 64 --prompt-len 1024 1024 \\
        --new-tokens 1024 1024 --baselines static                 # a GPU
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import gptoss_jax
from gptoss_jax.demo import ensure_demo_checkpoint
from gptoss_jax.engine import Engine
from gptoss_jax.generate import generate

MODES = ("engine", "sequential", "static")


def make_workload(count: int, prompt_len: tuple[int, int], new_tokens: tuple[int, int], rate: float | None,
                  vocab_size: int, seed: int) -> list[dict[str, Any]]:
    """Requests with random prompts and lengths, and arrival times (seconds from the start)."""
    rng = np.random.default_rng(seed)
    arrivals = np.zeros(count) if rate is None else np.cumsum(rng.exponential(1.0 / rate, count)) - 1.0 / rate
    return [
        dict(prompt=rng.integers(0, vocab_size, int(rng.integers(prompt_len[0], prompt_len[1] + 1))).tolist(),
             new_tokens=int(rng.integers(new_tokens[0], new_tokens[1] + 1)), arrival=float(max(arrival, 0.0)))
        for arrival in arrivals
    ]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(workload: Sequence[dict[str, Any]], token_times: Sequence[Sequence[float]]) -> dict[str, float]:
    """Throughput and latencies from each request's token times (seconds from the start)."""
    first_tokens = [times[0] - request["arrival"] for request, times in zip(workload, token_times)]
    gaps = [later - earlier for times in token_times for earlier, later in zip(times, times[1:])]
    tokens = sum(len(times) for times in token_times)
    span = max(times[-1] for times in token_times) - min(request["arrival"] for request in workload)
    return dict(output_tokens=tokens, seconds=span, output_tokens_per_second=tokens / span,
                ttft_p50=percentile(first_tokens, 50), ttft_p99=percentile(first_tokens, 99),
                itl_p50=percentile(gaps, 50), itl_p99=percentile(gaps, 99))


def run_engine(engine: Engine, workload: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Submit each request at its arrival time; returns each request's token times."""
    handles = [None] * len(workload)
    start = time.perf_counter()

    def submit_all() -> None:
        for index, request in enumerate(workload):
            delay = start + request["arrival"] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            handles[index] = engine.submit(request["prompt"], max_tokens=request["new_tokens"], temperature=0)

    submitter = threading.Thread(target=submit_all)
    submitter.start()
    submitter.join()
    results = [handle.result() for handle in handles]
    for request, result in zip(workload, results):
        assert result.completion_tokens == request["new_tokens"], (result.completion_tokens, request["new_tokens"])
    return [[t - start for t in result.token_times] for result in results]


def _derived_token_times(begin: float, stats, count: int) -> list[float]:
    """Token times of a non-streamed generate call that began at ``begin``: see the module docstring."""
    first = begin + stats.prefill_seconds
    step = stats.decode_seconds / max(count - 1, 1)
    return [first + i * step for i in range(count)]


def run_sequential(model, workload: Sequence[dict[str, Any]], chunk: int) -> list[list[float]]:
    times = []
    now = 0.0
    for request in workload:
        now = max(now, request["arrival"])
        out = generate(model, [request["prompt"]], max_new_tokens=request["new_tokens"], temperature=0,
                       prefill_chunk_size=chunk)
        token_times = _derived_token_times(now, out.stats, request["new_tokens"])
        times.append(token_times)
        now = token_times[-1]
    return times


def run_static(model, workload: Sequence[dict[str, Any]], chunk: int) -> list[list[float]]:
    begin = max(request["arrival"] for request in workload)
    longest = max(request["new_tokens"] for request in workload)
    out = generate(model, [request["prompt"] for request in workload], max_new_tokens=longest, temperature=0,
                   prefill_chunk_size=chunk)
    every = _derived_token_times(begin, out.stats, longest)
    return [every[:request["new_tokens"]] for request in workload]


def load_model(name: str, dtype: str, kernels: str):
    if name == "demo":
        return gptoss_jax.load(ensure_demo_checkpoint(), dtype=jnp.dtype(dtype), kernels=kernels)
    from benchmarks.gpu.e2e import build_model
    from gptoss_jax.config import preset

    return build_model(preset(name), kernels, seed=0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo (the embedded checkpoint) or a preset name with "
                        "random weights (gpt-oss-20b, gpt-oss-120b, tiny, small)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the demo model's compute dtype (presets run in bfloat16)")
    parser.add_argument("--kernels", default="auto", choices=("auto", "pallas", "xla"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    parser.add_argument("--max-batch", type=int, default=None, help="engine slots (default: --requests)")
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--burst-steps", type=int, default=16)
    parser.add_argument("--burst-steps-busy", type=int, default=4)
    parser.add_argument("--baselines", nargs="*", default=["sequential", "static"], choices=MODES[1:])
    parser.add_argument("--prefill-budget", type=int, default=2048)
    parser.add_argument("--traffic", nargs="+", choices=("a", "b", "c"),
                        help="run these real-traffic workloads (cache on, off, one at a time) instead")
    parser.add_argument("--modes", nargs="+", default=["on", "off", "alone"], choices=("on", "off", "alone"),
                        help="--traffic: the modes to run (default all: cache on, cache off, one at a time)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="--traffic: multiply the workloads' prompt lengths by this (GPU shapes: more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model = load_model(args.model, args.dtype, args.kernels)
    if args.traffic:
        from benchmarks.throughput.engine_traffic import run_traffic

        return run_traffic(model, args)
    config = model.config
    workload = make_workload(args.requests, tuple(args.prompt_len), tuple(args.new_tokens), args.rate,
                             config.vocab_size, args.seed)
    context = max(len(r["prompt"]) + r["new_tokens"] for r in workload)
    max_context = min(1 << (context - 1).bit_length(), config.max_position_embeddings)
    engine = Engine(model, max_batch=args.max_batch or args.requests, max_context=max_context,
                    prefill_chunk=args.prefill_chunk, prefill_budget=args.prefill_budget, burst_steps=args.burst_steps,
                    burst_steps_busy=args.burst_steps_busy)
    runners = dict(engine=lambda: run_engine(engine, workload),
                   sequential=lambda: run_sequential(model, workload, args.prefill_chunk),
                   static=lambda: run_static(model, workload, args.prefill_chunk))
    modes = ["engine", *args.baselines]
    device = jax.devices()[0].device_kind
    print(f"{args.model} ({args.dtype if args.model == 'demo' else 'bfloat16'}) on {device}: {args.requests} requests, "
          f"prompts {args.prompt_len[0]}-{args.prompt_len[1]}, outputs {args.new_tokens[0]}-{args.new_tokens[1]} "
          f"tokens, arrivals {'at once' if args.rate is None else f'{args.rate}/s'}; engine {engine.max_batch} slots x "
          f"{max_context}, bursts {args.burst_steps}/{args.burst_steps_busy}", flush=True)
    results: dict[str, Any] = dict(model=args.model, device=device, requests=args.requests, rate=args.rate,
                                   prompt_len=args.prompt_len, new_tokens=args.new_tokens, modes={})
    for mode in modes:
        runners[mode]()  # warm-up: compiles every program the timed pass needs
        figures = summarize(workload, runners[mode]())
        results["modes"][mode] = figures
        print(f"{mode:>10}: {figures['output_tokens_per_second']:8.1f} output tok/s   "
              f"TTFT p50 {figures['ttft_p50']:.3f} p99 {figures['ttft_p99']:.3f} s   "
              f"ITL p50 {figures['itl_p50'] * 1e3:.1f} p99 {figures['itl_p99'] * 1e3:.1f} ms", flush=True)
    engine.close()
    results["engine_programs"] = engine.programs
    for baseline in args.baselines:
        rates = {mode: figures["output_tokens_per_second"] for mode, figures in results["modes"].items()}
        ratio = rates["engine"] / rates[baseline]
        results[f"engine_over_{baseline}"] = ratio
        print(f"engine / {baseline}: {ratio:.2f}x output tokens/s")
    print(f"engine programs compiled: {engine.programs}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
