"""Decode tokens/s on the CPU: ``gptoss_jax.generate`` against Hugging Face ``generate``.

One mid-size gpt-oss-shaped model with random weights (``BENCH_CONFIG``: 8 layers, 16 experts
top-4, hidden 512, expert size 768, 8 query / 2 KV heads of 64, vocabulary 8192, window 128;
about 14 M parameters per layer before MXFP4 packing) is written once as a Hugging Face
checkpoint (MXFP4 experts). This project loads it with ``gptoss_jax.load`` and decodes the
experts once (``model.decode_experts()``, a bfloat16 copy); transformers loads the same files
with ``GptOssForCausalLM`` and ``Mxfp4Config(dequantize=True)``, which dequantizes them at load. Both decode
greedily, in the same dtype, from the same prompt for the same number of new tokens, with their
KV caches, after a warm-up run each.

Torch's thread count matters a lot on a small, shared CPU (with every core busy elsewhere, its
spinning worker threads can make it ten times slower), so transformers runs once with one thread
and once with all cores, and the faster figure is the baseline; both are printed.

The figures count decode steps only. Ours is ``stats.decode_tokens_per_second`` (compilation is
reported apart, in ``stats.compile_seconds``). Transformers has no such split, so its decode
time is that of a ``max_new_tokens=N`` run minus that of a ``max_new_tokens=1`` run (the prefill
and the first token), for N - 1 tokens. Each side takes the median of ``--repeats`` runs.

Usage: python -m benchmarks.throughput.decode_cpu [--new-tokens 128] [--prompt-tokens 64] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import gptoss_jax
from gptoss_jax.checkpoints.layouts import Layout
from gptoss_jax.checkpoints.safetensors_writer import write_checkpoint
from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import GptOss

BENCH_CONFIG = GptOssConfig(
    num_hidden_layers=8, num_experts=16, experts_per_token=4, vocab_size=8192, hidden_size=512,
    intermediate_size=768, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
    sliding_window=128,
)


def cpu_description() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and the cores this process may use."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return f"{model}, {len(os.sched_getaffinity(0))} cores usable ({os.cpu_count()} online)"


def write_random_checkpoint(folder: Path) -> None:
    # rbg keys: eager initialisation with threefry compiles per shape and takes minutes here.
    model = GptOss(BENCH_CONFIG, kernels="xla", rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    write_checkpoint(model, folder, Layout.HF)


def ours(folder: Path, prompt: list[int], new_tokens: int, dtype: str, repeats: int) -> tuple[float, float, list[int]]:
    """(decode tokens/s, compile seconds, tokens) of gptoss_jax.generate."""
    model = gptoss_jax.load(folder, dtype=getattr(jnp, dtype), kernels="xla")
    # transformers dequantizes the MXFP4 experts when it loads them on the CPU; do the same.
    model.decode_experts()
    warm_up = gptoss_jax.generate(model, [prompt], max_new_tokens=new_tokens, temperature=0)
    rates = []
    for _ in range(repeats):
        output = gptoss_jax.generate(model, [prompt], max_new_tokens=new_tokens, temperature=0)
        assert output.stats.decode_tokens == new_tokens, "a stop token ended generation early"
        rates.append(output.stats.decode_tokens_per_second)
    return statistics.median(rates), warm_up.stats.compile_seconds, output.tokens[0]


def transformers_side(
    folder: Path, prompt: list[int], new_tokens: int, dtype: str, repeats: int
) -> tuple[dict[int, float], list[int]]:
    """({torch threads: decode tokens/s}, tokens) of transformers' GptOssForCausalLM.generate."""
    model = transformers.GptOssForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype), quantization_config=transformers.Mxfp4Config(dequantize=True),
    ).eval()
    input_ids = torch.tensor([prompt])

    def timed(tokens: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                min_new_tokens=tokens, do_sample=False, use_cache=True, pad_token_id=0,
            )
        return time.perf_counter() - start, output

    rates = {}
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        torch.set_num_threads(threads)
        timed(new_tokens)  # warm-up
        runs = []
        for _ in range(repeats):
            first_seconds, _ = timed(1)
            all_seconds, output = timed(new_tokens)
            runs.append((new_tokens - 1) / (all_seconds - first_seconds))
        rates[threads] = statistics.median(runs)
    return rates, output[0, len(prompt):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    prompt = np.random.default_rng(0).integers(0, BENCH_CONFIG.vocab_size, args.prompt_tokens).tolist()
    print(f"machine: {cpu_description()}")
    print(f"versions: jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: {BENCH_CONFIG}")
    print(f"run: {args.dtype}, greedy, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(Path(folder))
        our_rate, compile_seconds, our_tokens = ours(Path(folder), prompt, args.new_tokens, args.dtype, args.repeats)
        their_rates, their_tokens = transformers_side(Path(folder), prompt, args.new_tokens, args.dtype, args.repeats)
    their_rate = max(their_rates.values())
    agreeing = next((i for i, (a, b) in enumerate(zip(our_tokens, their_tokens)) if a != b), len(our_tokens))
    print(f"gptoss_jax.generate:       {our_rate:8.1f} decode tokens/s (compile {compile_seconds:.1f} s, excluded)")
    for threads, rate in their_rates.items():
        print(f"transformers generate:     {rate:8.1f} decode tokens/s (torch threads {threads})")
    print(f"ratio (ours / transformers' best): {our_rate / their_rate:.2f}x (goal >= 2x)")
    print(f"greedy tokens agree for the first {agreeing} of {len(our_tokens)}")


if __name__ == "__main__":
    main()
