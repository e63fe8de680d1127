"""The XLA path's decode-sized MXFP4 expert matmul: its two forms side by side.

``pallas_kernels.mxfp4_moe_reference.few_rows_product`` multiplies a few rows (decode: tokens x
top-k of them) by their experts' MXFP4 weights in one of two forms: ``per_row`` (a matrix-vector
product per row, decoding its expert each time) and ``by_expert`` (each distinct expert decoded
once, in a loop). The reference picks ``per_row`` on XLA's CPU backend and ``by_expert`` elsewhere.
This measures both at gpt-oss-20b's expert shapes (32 experts, top-4; mlp1 5760 x 2880, mlp2
2880 x 2880) and 1 and 8 tokens, with the routing drawn at random:

* on JAX's default device (this machine's CPU; a GPU where there is one): the median time of
  each form, and their ratio;
* with ``--gpu NAME`` (a row of ``benchmarks.gpu.gpu_targets``): the temporaries XLA's GPU compiler
  gives each form, compiled deviceless on the CPU (nothing runs).

    python -m benchmarks.throughput.moe_reference [--repeats 5] [--gpu "RTX 4090"]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu import gpu_targets
from pallas_kernels import mxfp4
from pallas_kernels.mxfp4_moe_reference import few_rows_product

NUM_EXPERTS, TOP_K, HIDDEN = 32, 4, 2880
MATMULS = {"mlp1": 5760, "mlp2": 2880}  # out features; in features are HIDDEN for both
TOKENS = (1, 8)
FORMS = ("per_row", "by_expert")


def _product(form: str, lhs: jax.Array, expert: jax.Array, blocks: jax.Array, scales: jax.Array) -> jax.Array:
    """``few_rows_product`` of ``lhs [M, K]`` rows by their ``expert [M]``'s MXFP4 weights."""
    weights_of = lambda e: mxfp4.dequantize(blocks[e], scales[e], lhs.dtype)  # noqa: E731
    return few_rows_product(lhs, expert, weights_of, NUM_EXPERTS, form=form)


def _shapes(tokens: int, out_features: int, sharding: jax.sharding.Sharding | None = None) -> tuple:
    rows = tokens * TOP_K
    return (jax.ShapeDtypeStruct((rows, HIDDEN), jnp.bfloat16, sharding=sharding),
            jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sharding),
            jax.ShapeDtypeStruct((NUM_EXPERTS, out_features, HIDDEN // 32, 16), jnp.uint8, sharding=sharding),
            jax.ShapeDtypeStruct((NUM_EXPERTS, out_features, HIDDEN // 32), jnp.uint8, sharding=sharding))


def _operands(tokens: int, out_features: int, rng: np.random.Generator) -> tuple[jax.Array, ...]:
    """Random rows, each token's top-k distinct experts sorted as the model sorts them, and weights."""
    rows = tokens * TOP_K
    expert = np.sort(np.concatenate([rng.choice(NUM_EXPERTS, TOP_K, replace=False) for _ in range(tokens)]))
    blocks = rng.integers(0, 256, (NUM_EXPERTS, out_features, HIDDEN // 32, 16), np.uint8)
    scales = rng.integers(120, 130, (NUM_EXPERTS, out_features, HIDDEN // 32), np.uint8)
    return (jnp.asarray(rng.standard_normal((rows, HIDDEN)), jnp.bfloat16), jnp.asarray(expert, jnp.int32),
            jnp.asarray(blocks), jnp.asarray(scales))


def times(repeats: int) -> list[dict]:
    """Median seconds of each form per (matmul, tokens) on the default device; the forms agree up to the order
    of their float32 sums."""
    rng = np.random.default_rng(0)
    rows = []
    for matmul, out_features in MATMULS.items():
        for tokens in TOKENS:
            operands = _operands(tokens, out_features, rng)
            row = {"matmul": matmul, "tokens": tokens, "distinct_experts": len(np.unique(operands[1]))}
            results = []
            for form in FORMS:
                program = jax.jit(functools.partial(_product, form))
                results.append(np.asarray(program(*operands)))  # compiles; a warm-up
                seconds = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    program(*operands).block_until_ready()
                    seconds.append(time.perf_counter() - start)
                row[form] = statistics.median(seconds)
            np.testing.assert_allclose(*results, rtol=1e-4, atol=1e-3)
            rows.append(row)
            print(f"| {matmul} | {tokens} | {row['distinct_experts']} | {row['per_row'] * 1e3:.1f} | "
                  f"{row['by_expert'] * 1e3:.1f} | {row['by_expert'] / row['per_row']:.2f} |", flush=True)
    return rows


def gpu_temporaries(target: gpu_targets.GpuTarget, matmuls: Sequence[str] = tuple(MATMULS),
                    token_counts: Sequence[int] = TOKENS) -> list[dict]:
    """Each form's temporary bytes from XLA's GPU compiler for ``target`` (deviceless)."""
    sharding = jax.sharding.SingleDeviceSharding(gpu_targets.compile_only_device(target))
    rows = []
    for matmul in matmuls:
        out_features = MATMULS[matmul]
        for tokens in token_counts:
            row = {"matmul": matmul, "tokens": tokens}
            for form in FORMS:
                compiled = jax.jit(functools.partial(_product, form)).trace(
                    *_shapes(tokens, out_features, sharding)).lower().compile()
                row[form] = compiled.memory_analysis().temp_size_in_bytes
            rows.append(row)
            print(f"| {matmul} | {tokens} | {row['per_row'] / 1e6:.0f} | {row['by_expert'] / 1e6:.0f} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each form (the median is kept)")
    parser.add_argument("--gpu", choices=[target.name for target in gpu_targets.GPU_TARGETS],
                        help="instead of timing on the CPU, compile both forms for this GPU (deviceless) and "
                             "print their temporaries")
    args = parser.parse_args()
    if args.gpu:
        gpu_targets.restart_deviceless("benchmarks.throughput.moe_reference")
        print(f"XLA's GPU compiler for an {args.gpu}, temporaries of one matmul (MB):\n"
              "| matmul | tokens | per_row | by_expert |\n|---|---|---|---|", flush=True)
        gpu_temporaries(gpu_targets.gpu_target(args.gpu))
        return
    print(f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}), median of {args.repeats}:\n"
          "| matmul | tokens | distinct experts | per_row ms | by_expert ms | by_expert / per_row |\n"
          "|---|---|---|---|---|---|", flush=True)
    times(args.repeats)


if __name__ == "__main__":
    main()
