"""Throughput of quantizing dense (bfloat16) expert weights to MXFP4, as loading a fine-tuned
checkpoint does, against a copy of the same bytes run side by side.

The tensor is gpt-oss-120b's ``mlp.experts.gate_up_proj`` ``[E, 2880, 5760]`` bfloat16 with
``--experts`` of its 128 experts (16 by default: 0.53 GB), random and in memory, quantized by
:func:`gptoss_jax.checkpoints.dense_experts.quantize_dense_experts` on JAX's default device
(the CPU here). The figure is GB/s of bfloat16 read; the baseline is NumPy copying the same
bytes into a preallocated array, a bound no pass over them can beat by much on one core.

    python -m benchmarks.throughput.quantize_throughput [--experts 16] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from gptoss_jax.checkpoints.dense_experts import CHUNK_BYTES, experts_per_chunk, quantize_dense_experts
from gptoss_jax.config import preset


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed runs, after one untimed (compiling, faulting pages in)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=16, help="experts of the 120b mlp1 tensor (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest counts (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    config = preset("gpt-oss-120b")
    shape = (args.experts, config.hidden_size, 2 * config.intermediate_size)  # [E, K, N] as saved
    dense = (np.random.default_rng(0).standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    copy = np.empty_like(dense)

    quantize_seconds = best_seconds(
        lambda: quantize_dense_experts(lambda experts: dense[experts], shape, dense.dtype, "benchmark"), args.repeats)
    copy_seconds = best_seconds(lambda: np.copyto(copy, dense), args.repeats)
    report = {
        "device": str(jax.devices()[0].device_kind),
        "bf16_bytes": dense.nbytes,
        "experts_per_step": experts_per_chunk(shape, dense.itemsize),
        "chunk_bytes": CHUNK_BYTES,
        "quantize_gb_per_s": dense.nbytes / quantize_seconds / 1e9,
        "copy_gb_per_s": dense.nbytes / copy_seconds / 1e9,
    }
    print(f"{report['device']}: quantizing {dense.nbytes / 1e9:.2f} GB of bf16 experts "
          f"({report['experts_per_step']} a step): {report['quantize_gb_per_s']:.2f} GB/s of bf16 read; "
          f"NumPy copying the same bytes: {report['copy_gb_per_s']:.2f} GB/s; ratio "
          f"{report['quantize_gb_per_s'] / report['copy_gb_per_s']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
