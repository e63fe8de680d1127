"""The HTTP server under N concurrent streaming clients, against the same requests one after another.

Starts ``gptoss-jax serve``'s app in this process on a free local port (the demo model by default,
or a preset's shapes with random weights), then sends ``--clients`` streaming
``/v1/completions`` requests (random token-id prompts, greedy, no stop, mixed lengths) through
the official ``openai`` client: all at once, then one at a time, after a warm-up pass of each.
Raw completions stream every token as text, where a random model's chat replies may hold no
content to time.

Reported per mode: output tokens/s (every request's completion tokens over the wall time),
time to first token (from sending) p50/p99 and inter-token latency (gaps between a stream's
chunks; a decode burst arrives as one chunk) p50/p99.

Usage (from the repository root)::

    python -m benchmarks.throughput.serve                        # demo model, CPU, 16 clients
    python -m benchmarks.throughput.serve --model gpt-oss-20b --clients 64 --prompt-len 1024 1024 --new-tokens 1024 1024
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import openai
import uvicorn

from benchmarks.throughput.engine import load_model, make_workload, percentile
from gptoss_jax.demo import ensure_demo_checkpoint
from gptoss_jax.engine import Engine
from gptoss_jax.serving.app import create_app
from gptoss_jax.serving.state import ServerState
from gptoss_jax.tokenizer import Tokenizer, build_demo_tokenizer


def one_stream(client: openai.OpenAI, request: dict[str, Any]) -> dict[str, Any]:
    """Send one streaming completion; returns its chunk arrival times (from sending) and its token count."""
    start = time.perf_counter()
    times, tokens = [], 0
    stream = client.completions.create(model="bench", prompt=request["prompt"], max_tokens=request["new_tokens"],
                                       temperature=0, stream=True, stream_options=dict(include_usage=True))
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter() - start)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return dict(times=times, tokens=tokens)


def run(client: openai.OpenAI, workload: Sequence[dict[str, Any]], concurrent: bool) -> dict[str, float]:
    begin = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(workload)) as pool:
            streams = list(pool.map(lambda request: one_stream(client, request), workload))
    else:
        streams = [one_stream(client, request) for request in workload]
    seconds = time.perf_counter() - begin
    first = [s["times"][0] for s in streams if s["times"]]
    gaps = [b - a for s in streams for a, b in zip(s["times"], s["times"][1:])]
    tokens = sum(s["tokens"] for s in streams)
    return dict(output_tokens=tokens, seconds=seconds, output_tokens_per_second=tokens / seconds,
                ttft_p50=percentile(first, 50), ttft_p99=percentile(first, 99),
                itl_p50=percentile(gaps, 50), itl_p99=percentile(gaps, 99))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="demo, or a preset with random weights (gpt-oss-20b, ...)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the demo model's dtype")
    parser.add_argument("--kernels", default="auto", choices=("auto", "pallas", "xla"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", type=int, nargs=2, default=(64, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--skip-sequential", action="store_true", help="only the concurrent pass (long GPU runs)")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model = load_model(args.model, args.dtype, args.kernels)
    # A preset's random weights need no real vocabulary: the demo tokenizer at the model's size
    # (gpt-oss's special-token ids) decodes every id.
    tokenizer = Tokenizer.from_pretrained_dir(ensure_demo_checkpoint()) if args.model == "demo" else \
        build_demo_tokenizer(model.config.vocab_size)
    vocab = min(model.config.vocab_size, tokenizer.vocab_size) - 32  # plain tokens, below the special ones
    workload = make_workload(args.clients, tuple(args.prompt_len), tuple(args.new_tokens), None, vocab, 0)
    context = max(len(r["prompt"]) + r["new_tokens"] for r in workload)
    engine = Engine(model, max_batch=args.clients, max_context=1 << (context - 1).bit_length())
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServerState(tokenizer, "bench", engine=engine)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    device = jax.devices()[0].device_kind
    print(f"{args.model} on {device}: {args.clients} streaming clients over HTTP, prompts {args.prompt_len[0]}-"
          f"{args.prompt_len[1]}, outputs {args.new_tokens[0]}-{args.new_tokens[1]} tokens", flush=True)
    results: dict[str, Any] = dict(model=args.model, device=device, clients=args.clients, modes={})
    modes = [("concurrent", True)] + ([] if args.skip_sequential else [("sequential", False)])
    for name, concurrent in modes:
        run(client, workload, concurrent)  # warm-up: compiles every program
        figures = run(client, workload, concurrent)
        results["modes"][name] = figures
        print(f"{name:>10}: {figures['output_tokens_per_second']:8.1f} output tok/s   "
              f"TTFT p50 {figures['ttft_p50']:.3f} p99 {figures['ttft_p99']:.3f} s   "
              f"ITL p50 {figures['itl_p50'] * 1e3:.1f} p99 {figures['itl_p99'] * 1e3:.1f} ms", flush=True)
    if not args.skip_sequential:
        ratio = (results["modes"]["concurrent"]["output_tokens_per_second"]
                 / results["modes"]["sequential"]["output_tokens_per_second"])
        results["concurrent_over_sequential"] = ratio
        print(f"concurrent / sequential: {ratio:.2f}x output tokens/s")
    server.should_exit = True
    thread.join()
    engine.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
