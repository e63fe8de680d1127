"""Attention kernels on a Hopper GPU: prefill TFLOP/s and decode HBM bandwidth.

Measures the Mosaic GPU kernels (``pallas_kernels.flash_attention``, ``.decode_attention``) and
the plain-XLA reference at gpt-oss attention shapes (64 query heads, 8 KV heads, head_dim 64),
prints a Markdown table with each figure as a fraction of the device's peak and the largest
difference between kernel and reference where both ran. It measures; it asserts nothing.

  python -m benchmarks.gpu.attention_kernel [--prefill 4096 32768 131072] [--decode 4096 32768 131072]
      [--chunk 4096] [--chunk-after 28672]

Decode rows come for the default config and for each variant of
:func:`benchmarks.kernels.kernel_cases.variant_configs` (the case's name says which), each beside the
cost model's prediction for it.

Prefill is a prompt's first chunk (the flash-attention kernel); "chunk" is a later prefill chunk
of ``--chunk`` tokens after ``--chunk-after`` cached ones on a full layer (the decode-attention
kernel, written to the cache first as the model does). FLOPs count only visible (query, key)
pairs: 4 * D per pair per query head (QK^T and PV), so a causal layer does about half and a
sliding layer about 128/T of the square. Decode bytes are the K and V slots read (occupied
slots only) plus q and the output. Times are the kernels' own (CUPTI), with L2 evicted before
each timed call (:func:`benchmarks.gpu.gpu_measure.kernel_seconds`): a decode call of a few
microseconds would otherwise be mostly the host's dispatch time.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu.gpu_measure import Peaks, device_peaks, kernel_seconds
from benchmarks.kernels.kernel_cost import predicted_cell
from benchmarks.kernels.kernel_cases import DecodeCase, PrefillCase, config_suffix, variant_configs
from pallas_kernels.attention_reference import attention_reference
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention

Q_HEADS, KV_HEADS, HEAD_DIM, WINDOW = 64, 8, 64, 128
SCALE = HEAD_DIM**-0.5


def fits(nbytes: float) -> bool:
    stats = jax.devices()[0].memory_stats() or {}
    return nbytes < 0.6 * stats.get("bytes_limit", 80e9)


def visible_pairs(seq_len: int, window: int | None) -> int:
    keys = np.minimum(np.arange(1, seq_len + 1), window or seq_len)
    return int(keys.sum())


def random_inputs(seed: int, batch: int, q_len: int, kv_len: int) -> tuple[jax.Array, ...]:
    """bf16 ``q [B, Tq, Hq, D], k, v [B, S, Hkv, D]`` and sinks ``[Hq]``."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (batch, q_len, Q_HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, kv_len, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, kv_len, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    return q, k, v, jnp.linspace(-4.0, 4.0, Q_HEADS).astype(jnp.bfloat16)


def bench_prefill(seq_len: int, window: int | None, peaks: Peaks | None, iters: int) -> dict:
    q, k, v, sinks = random_inputs(0, 1, seq_len, seq_len)
    positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
    kernel = jax.jit(
        lambda q, k, v, s: flash_attention(q, k, v, s, sliding_window=window, softmax_scale=SCALE)
    )
    reference = jax.jit(
        lambda q, k, v, s: attention_reference(
            q, k, v, s, positions, positions, sliding_window=window, softmax_scale=SCALE
        )
    )
    flops = 4 * HEAD_DIM * Q_HEADS * visible_pairs(seq_len, window)
    row = {"case": f"prefill T={seq_len} {'window' if window else 'full'}"}
    row["predicted us (bound)"] = predicted_cell(PrefillCase(seq_len, window), jax.devices()[0].device_kind)
    seconds = kernel_seconds(kernel, q, k, v, sinks, iters=iters)
    row["kernel"] = f"{seconds * 1e3:.3f} ms, {flops / seconds / 1e12:.1f} TFLOP/s"
    row["peak"] = f"{flops / seconds / peaks.bf16_flops:.1%}" if peaks else "?"
    # The reference holds f32 scores, exponentials and bf16 probabilities for every head.
    if fits(10 * Q_HEADS * seq_len * seq_len):
        ref_seconds = kernel_seconds(reference, q, k, v, sinks, iters=iters)
        row["xla"] = f"{ref_seconds * 1e3:.3f} ms, {flops / ref_seconds / 1e12:.1f} TFLOP/s"
        diff = jnp.abs(kernel(q, k, v, sinks).astype(jnp.float32) - reference(q, k, v, sinks))
        row["max |kernel - xla|"] = f"{float(diff.max()):.2e}"
    else:
        row["xla"] = "does not fit"
    return row


def bench_chunk(chunk: int, cached: int, peaks: Peaks | None, iters: int) -> dict:
    """A later prefill chunk on a full layer: positions cached..cached+chunk-1 against a cache
    holding positions 0..cached+chunk-1 (the chunk written first), one slot per position."""
    cache_len = cached + chunk
    q, k, v, sinks = random_inputs(2, 1, chunk, cache_len)
    q_positions = jnp.arange(cached, cache_len, dtype=jnp.int32)[None]
    kv_positions = jnp.arange(cache_len, dtype=jnp.int32)[None]
    args = (q, k, v, sinks, q_positions, kv_positions)
    kernel = jax.jit(lambda *a: decode_attention(*a, sliding_window=None, softmax_scale=SCALE))
    reference = jax.jit(lambda *a: attention_reference(*a, sliding_window=None, softmax_scale=SCALE))
    pairs = visible_pairs(cache_len, None) - visible_pairs(cached, None)
    flops = 4 * HEAD_DIM * Q_HEADS * pairs
    row = {"case": f"chunk T={chunk} after {cached} full"}
    seconds = kernel_seconds(kernel, *args, iters=iters)
    row["kernel"] = f"{seconds * 1e3:.3f} ms, {flops / seconds / 1e12:.1f} TFLOP/s"
    row["peak"] = f"{flops / seconds / peaks.bf16_flops:.1%}" if peaks else "?"
    if fits(10 * Q_HEADS * chunk * cache_len):
        ref_seconds = kernel_seconds(reference, *args, iters=iters)
        row["xla"] = f"{ref_seconds * 1e3:.3f} ms, {flops / ref_seconds / 1e12:.1f} TFLOP/s"
        diff = jnp.abs(kernel(*args).astype(jnp.float32) - reference(*args).astype(jnp.float32))
        row["max |kernel - xla|"] = f"{float(diff.max()):.2e}"
    else:
        row["xla"] = "does not fit"
    return row


def bench_decode(cache_len: int, batch: int, window: int | None, peaks: Peaks | None, iters: int) -> list[dict]:
    """The default config against the XLA reference, then each of
    :func:`benchmarks.kernels.kernel_cases.variant_configs`' decode-attention configs, a row each."""
    q, k, v, sinks = random_inputs(1, batch, 1, cache_len)
    # Full caches: every slot occupied, slot = position. The ring buffer: wrapped, positions
    # 10_000 - 128 .. 10_000 - 1 scattered over its slots.
    if window is None:
        kv_positions = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (batch, cache_len))
        newest = cache_len - 1
    else:
        newest = 10_000 - 1
        slots = jnp.arange(cache_len, dtype=jnp.int32)
        kv_positions = jnp.broadcast_to(newest - (newest - slots) % cache_len, (batch, cache_len))
    q_positions = jnp.full((batch, 1), newest, jnp.int32)
    args = (q, k, v, sinks, q_positions, kv_positions)
    reference = jax.jit(
        lambda *a: attention_reference(*a, sliding_window=window, softmax_scale=SCALE)
    )
    nbytes = 2 * k.nbytes + 2 * q.nbytes + kv_positions.nbytes
    rows = []
    for config in (None, *variant_configs()["decode"]):
        kernel = jax.jit(lambda *a, config=config: decode_attention(*a, sliding_window=window, softmax_scale=SCALE,
                                                                    config=config))
        row = {"case": f"decode B={batch} S={cache_len} {'ring' if window else 'full'}{config_suffix(config)}"}
        # kernel_sass names a ring by the context it serves; its cache is the window whatever that is.
        modelled = DecodeCase(batch, cache_len if window is None else 4096, window, config=config)
        row["predicted us (bound)"] = predicted_cell(modelled, jax.devices()[0].device_kind)
        seconds = kernel_seconds(kernel, *args, iters=iters)
        row["kernel"] = f"{seconds * 1e6:.1f} us, {nbytes / seconds / 1e12:.2f} TB/s"
        row["peak"] = f"{nbytes / seconds / peaks.hbm_bytes_per_second:.1%}" if peaks else "?"
        diff = jnp.abs(kernel(*args).astype(jnp.float32) - reference(*args).astype(jnp.float32))
        row["max |kernel - xla|"] = f"{float(diff.max()):.2e}"
        rows.append(row)
    ref_seconds = kernel_seconds(reference, *args, iters=iters)
    rows[0]["xla"] = f"{ref_seconds * 1e6:.1f} us, {nbytes / ref_seconds / 1e12:.2f} TB/s"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, nargs="*", default=[4096, 32768, 131072])
    parser.add_argument("--decode", type=int, nargs="*", default=[4096, 32768, 131072])
    parser.add_argument("--decode-batch", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--chunk", type=int, nargs="*", default=[4096])
    parser.add_argument("--chunk-after", type=int, default=28672)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    device = jax.devices()[0]
    if device.platform != "gpu":
        sys.exit(f"attention_kernel.py needs a GPU (sm_90 for Mosaic GPU kernels); found {device}.")
    peaks = device_peaks(device)
    if peaks:
        print(f"device: {device.device_kind}; peaks: {peaks.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
              f"{peaks.hbm_bytes_per_second / 1e12:.2f} TB/s")
    else:
        print(f"device: {device.device_kind}; peaks unknown, fractions of peak left out")

    rows = []
    for seq_len in args.prefill:
        for window in (None, WINDOW):
            rows.append(bench_prefill(seq_len, window, peaks, args.iters))
            print(rows[-1], flush=True)
    for chunk in args.chunk:
        rows.append(bench_chunk(chunk, args.chunk_after, peaks, args.iters))
        print(rows[-1], flush=True)
    for batch in args.decode_batch:
        for cache_len, window in [(c, None) for c in args.decode] + [(WINDOW, WINDOW)]:
            rows += (variants := bench_decode(cache_len, batch, window, peaks, args.iters))
            print(*variants, sep="\n", flush=True)

    columns = ["case", "kernel", "peak", "predicted us (bound)", "xla", "max |kernel - xla|"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row.get(c, "") for c in columns) + " |")


if __name__ == "__main__":
    main()
