"""MXFP4 expert matmuls on a Hopper GPU: HBM bandwidth at decode, TFLOP/s at prefill.

Times, at gpt-oss shapes (hidden 2880, top-4 routing, 32 or 128 experts):

* ``kernel``: ``pallas_kernels.mxfp4_moe.mxfp4_grouped_matmul`` (packed MXFP4 in HBM, fused
  epilogue), including its XLA glue (even/odd split of the activations, task metadata);
  at decode sizes (up to :data:`VARIANT_TOKENS` tokens) also ``kernel <field>=<value>``, the
  same with each of :func:`benchmarks.kernels.kernel_cases.variant_configs`' configs (scales not
  folded, the earlier nibble decoding, the earlier scale loads, both): which a GPU prefers;
* ``xla``: the reference, dequantize-then-dot per active expert
  (``mxfp4_grouped_matmul_reference``: a batched product at decode sizes, row tiles of each
  expert's own rows at prefill);
* ``bf16``: jax's Mosaic GPU ``ragged_dot`` on weights dequantized to bf16 beforehand (no
  epilogue): the grouped matmul the packed format competes with.

With ``--mma``, the ``mma.sync`` expert kernel (``pallas_kernels.mxfp4_moe_mma``, the one
Ampere, Ada and Blackwell GPUs run; ``mma.sync`` runs on Hopper too) instead, beside the WGMMA
kernel and the reference, each checked against the reference: ``mma.sync`` as this GPU lowers it
(TMA copies on Hopper) and ``mma.sync sm_80`` as an sm_80 device lowers it (``cp.async`` copies,
the A100's and the RTX 4090's code path; :func:`benchmarks.kernels.kernel_cases.lowering_for`).

Both expert matmuls are measured: ``mlp1`` (N=5760, bias + clamped SwiGLU) and ``mlp2``
(N=2880, bias + routing weight, float32 out). Bytes are what each path must move at least:
the active experts' weights (packed bytes + scales for the kernel, bf16 for ``bf16``, the packed
ones for ``xla``, which rereads its dequantized copy besides), bias, activations in and out.
Bandwidth is bytes / time as a fraction of the device's HBM peak; TFLOP/s count 2*M*N*K and are
compared with the dense bf16 tensor-core peak. Times are the kernels' own (CUPTI), with L2
evicted before each timed call (:func:`benchmarks.gpu.gpu_measure.kernel_seconds`). Each case's rows
print as it finishes. It measures; it asserts nothing.

  python -m benchmarks.gpu.moe_kernel [--tokens 1 8 64 4096] [--models 20b 120b] [--iters 20]
  python -m benchmarks.gpu.moe_kernel --sweep --models 20b --tokens 1 64 4096   # tune Config
  python -m benchmarks.gpu.moe_kernel --mma --models 20b --tokens 1 8 64   # the mma.sync kernel
  python -m benchmarks.gpu.moe_kernel --interpret   # tiny CPU smoke run of the same code path
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from benchmarks.kernels.kernel_cases import MoeCase, config_suffix, lowering_for, variant_configs
from benchmarks.gpu.gpu_measure import Peaks, device_peaks, kernel_seconds
from benchmarks.kernels.kernel_cost import predicted_cell
from pallas_kernels import mxfp4
from pallas_kernels.expert_routing import group_by_expert
from pallas_kernels.mxfp4_moe import Config, mxfp4_grouped_matmul
from pallas_kernels.mxfp4_moe_mma import mxfp4_grouped_matmul_mma
from pallas_kernels.mxfp4_moe_reference import mxfp4_grouped_matmul_reference

HIDDEN, TOP_K = 2880, 4
VARIANT_TOKENS = 8
EXPERTS = {"20b": 32, "120b": 128}
# Tuning configs --sweep tries; block_kb must divide K/2 = 1440 and be a multiple of 32.
SWEEP = {"block_m": (16, 32, 64, 128), "block_kb": (96, 160, 288), "max_concurrent_steps": (2, 3, 4)}


def routed_problem(tokens: int, experts: int, n: int, seed: int):
    """Random MXFP4 experts and top-4 routing of ``tokens``, rows sorted by expert."""
    keys = jax.random.split(jax.random.key(seed), 6)
    blocks = jax.random.randint(keys[0], (experts, n, HIDDEN // 32, 16), 0, 256, jnp.int32)
    scales = jax.random.randint(keys[1], (experts, n, HIDDEN // 32), 118, 123, jnp.int32)
    bias = jax.random.normal(keys[2], (experts, n), jnp.bfloat16)
    x = jax.random.normal(keys[3], (tokens, HIDDEN), jnp.bfloat16)
    # Top-4 of random logits: distinct experts per token, like the router.
    _, expert_indices = jax.lax.top_k(jax.random.normal(keys[4], (tokens, experts)), TOP_K)
    groups = group_by_expert(expert_indices, experts)
    row_weights = jax.random.uniform(keys[5], (tokens * TOP_K,), jnp.float32)
    return dict(
        lhs=x[groups.token_index],
        group_sizes=groups.group_sizes,
        blocks=blocks.astype(jnp.uint8),
        scales=scales.astype(jnp.uint8),
        bias=bias,
    ), row_weights


def bf16_grouped_matmul(lhs, group_sizes, weights_bf16):
    """jax's Mosaic GPU ragged dot, weights ``[E, N, K]`` bf16 (no epilogue)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    block = 64  # divides 2880, 5760 and K=2880; rows are padded to it for whole TMA tiles
    rows = lhs.shape[0]
    padded = jnp.pad(lhs, ((0, -rows % block), (0, 0)))
    out = ragged_dot_mgpu.ragged_dot(
        padded, weights_bf16, group_sizes=group_sizes, block_m=block, block_n=block, block_k=block,
        max_concurrent_steps=4, grid_block_n=1, transpose_rhs=True,
    )
    return out[:rows]


@dataclasses.dataclass(frozen=True)
class Case:
    """One expert matmul at one model's shapes: its operands and what it must move and compute."""

    model: str
    tokens: int
    matmul: str  # "mlp1" (N=5760, SwiGLU) or "mlp2" (N=2880, routing weights)
    problem: dict
    row_weights: jax.Array | None
    epilogue: str
    active: int  # experts with rows
    packed_bytes: int  # the active experts' MXFP4 blocks and scales
    io_bytes: int  # activations, bias, output

    @classmethod
    def make(cls, model: str, tokens: int, matmul: str) -> Case:
        n, epilogue = (2 * HIDDEN, "bias_swiglu") if matmul == "mlp1" else (HIDDEN, "bias")
        problem, row_weights = routed_problem(tokens, EXPERTS[model], n, seed=tokens)
        weights = row_weights if matmul == "mlp2" else None
        rows = tokens * TOP_K
        active = int(jnp.count_nonzero(problem["group_sizes"]))
        out_n = n // 2 if epilogue == "bias_swiglu" else n
        out_bytes = rows * out_n * (4 if weights is not None else 2)
        return cls(model, tokens, matmul, problem, weights, epilogue, active,
                   packed_bytes=active * n * (HIDDEN // 2 + HIDDEN // 32),
                   io_bytes=rows * HIDDEN * 2 + active * n * 2 + out_bytes)

    @property
    def n(self) -> int:
        return self.problem["bias"].shape[1]

    @property
    def flops(self) -> int:
        return 2 * self.tokens * TOP_K * self.n * HIDDEN

    def kernel_seconds(self, config: Config, iters: int) -> float:
        kernel = jax.jit(functools.partial(mxfp4_grouped_matmul, epilogue=self.epilogue, config=config))
        return kernel_seconds(lambda *a: kernel(*a, row_weights=self.row_weights), *self.problem.values(), iters=iters)


def bench(case: Case, iters: int) -> dict:
    """Every path at one case: ``{path: (seconds, bytes moved)}`` plus the case's figures."""
    row = dict(model=case.model, tokens=case.tokens, matmul=case.matmul, active=case.active, flops=case.flops,
               predicted={})
    kernel_bytes = case.packed_bytes + case.io_bytes
    configs = [Config(), *(variant_configs()["moe"] if case.tokens <= VARIANT_TOKENS else ())]
    for config in configs:
        path = "kernel" + config_suffix(config)
        modelled = MoeCase(case.model, case.matmul, case.tokens, EXPERTS[case.model], case.n, HIDDEN, TOP_K,
                           config=config)
        row["predicted"][path] = predicted_cell(modelled, jax.devices()[0].device_kind)
        row[path] = (case.kernel_seconds(config, iters), kernel_bytes)

    args = (*case.problem.values(), case.row_weights)
    reference = jax.jit(functools.partial(mxfp4_grouped_matmul_reference, epilogue=case.epilogue))
    call = lambda *a: reference(*a[:5], row_weights=a[5])
    row["xla"] = (kernel_seconds(call, *args, iters=iters), kernel_bytes)
    out = mxfp4_grouped_matmul(*args[:5], epilogue=case.epilogue, row_weights=case.row_weights)
    row["max_abs_diff"] = {"kernel": _max_abs_difference(out, call(*args))}

    problem = case.problem
    weights_bf16 = mxfp4.dequantize(problem["blocks"], problem["scales"])  # [E, N, K]
    try:
        seconds = kernel_seconds(bf16_grouped_matmul, problem["lhs"], problem["group_sizes"],
                                 weights_bf16, iters=iters)
        row["bf16"] = (seconds, case.active * case.n * HIDDEN * 2 + case.io_bytes)
    except Exception as error:  # report the baseline's failure, keep measuring the rest
        row["bf16_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return row


def _max_abs_difference(out: jax.Array, reference: jax.Array) -> float:
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32))))


# The mma.sync kernel's paths: as this GPU lowers it, and as an sm_80 device does (cp.async).
MMA_PATHS = {"mma.sync": None, "mma.sync sm_80": "8.0"}


def bench_mma(case: Case, iters: int) -> dict:
    """The ``mma.sync`` kernel's paths (:data:`MMA_PATHS`) beside the WGMMA kernel and the
    reference at one case, each kernel with its largest difference to the reference."""
    row = dict(model=case.model, tokens=case.tokens, matmul=case.matmul, active=case.active, flops=case.flops,
               predicted={}, max_abs_diff={})
    kernel_bytes = case.packed_bytes + case.io_bytes
    args = (*case.problem.values(), case.row_weights)
    reference = jax.jit(functools.partial(mxfp4_grouped_matmul_reference, epilogue=case.epilogue))
    call = lambda *a: reference(*a[:5], row_weights=a[5])
    expected = call(*args)
    row["xla"] = (kernel_seconds(call, *args, iters=iters), kernel_bytes)
    row["kernel"] = (case.kernel_seconds(Config(), iters), kernel_bytes)
    row["predicted"]["kernel"] = ""
    row["max_abs_diff"]["kernel"] = _max_abs_difference(
        mxfp4_grouped_matmul(*args[:5], epilogue=case.epilogue, row_weights=case.row_weights), expected)
    for path, arch in MMA_PATHS.items():
        kernel = jax.jit(functools.partial(mxfp4_grouped_matmul_mma, epilogue=case.epilogue))
        try:
            with lowering_for(arch) if arch else contextlib.nullcontext():
                row[path] = (kernel_seconds(lambda *a: kernel(*a[:5], row_weights=a[5]), *args, iters=iters),
                             kernel_bytes)
                row["max_abs_diff"][path] = _max_abs_difference(kernel(*args[:5], row_weights=args[5]), expected)
        except Exception as error:  # report the path's failure, keep measuring the rest
            row["max_abs_diff"][path] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
        row["predicted"][path] = ""
    return row


def sweep(case: Case, iters: int) -> list[tuple[Config, float | str]]:
    """The kernel's time for every distinct config of :data:`SWEEP` at this case (or why not)."""
    rows_tile = max(8, pl.next_power_of_2(case.tokens * TOP_K))  # the kernel caps block_m by it
    configs = {Config(block_m=min(block_m, rows_tile), block_kb=block_kb, max_concurrent_steps=stages)
               for block_m, block_kb, stages in itertools.product(*SWEEP.values())}
    timings = []
    for config in sorted(configs, key=lambda c: (c.block_m, c.block_kb, c.max_concurrent_steps)):
        try:
            timings.append((config, case.kernel_seconds(config, iters)))
        except Exception as error:  # too much shared memory, or a compile failure: report it
            timings.append((config, f"{type(error).__name__}: {str(error).splitlines()[0][:60]}"))
    return timings


def print_sweep(case: Case, timings: list[tuple[Config, float | str]], peaks: Peaks) -> None:
    print(f"### {case.model}, {case.tokens} tokens, {case.matmul} ({case.active} active experts)\n")
    print("| block_m | block_kb | stages | time (us) | % HBM peak | % bf16 peak |")
    print("|---|---|---|---|---|---|")
    fastest = min((t for _, t in timings if isinstance(t, float)), default=None)
    for config, seconds in timings:
        head = f"| {config.block_m} | {config.block_kb} | {config.max_concurrent_steps} |"
        if isinstance(seconds, str):
            print(f"{head} {seconds} | | |")
            continue
        mark = " **fastest**" if seconds == fastest else ""
        print(f"{head} {seconds * 1e6:.1f}{mark} | "
              f"{100 * (case.packed_bytes + case.io_bytes) / seconds / peaks.hbm_bytes_per_second:.0f}% | "
              f"{100 * case.flops / seconds / peaks.bf16_flops:.1f}% |")
    print()


def print_table_header() -> None:
    print("| model | tokens | matmul | active experts | path | time (us) | predicted us (bound) | MB moved | GB/s | "
          "% HBM peak | TFLOP/s | % bf16 peak | max abs diff to xla |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def print_case_rows(r: dict, peaks: Peaks) -> None:
    """One case's rows of the table, a row per path (printed as each case is done, so a run cut
    short keeps the cases before)."""
    head = f"| {r['model']} | {r['tokens']} | {r['matmul']} | {r['active']} |"
    for path in (*r["predicted"], "xla", "bf16"):
        difference = r["max_abs_diff"].get(path, "")
        if path not in r:
            if difference:  # a path that failed
                print(f"{head} {path} | {difference} | | | | | | | |")
            continue
        seconds, nbytes = r[path]
        bandwidth, flop_rate = nbytes / seconds, r["flops"] / seconds
        difference = f"{difference:.3g}" if isinstance(difference, float) else difference
        predicted = r["predicted"].get(path, "")
        print(f"{head} {path} | {seconds * 1e6:.1f} | {predicted} | {nbytes / 1e6:.1f} | {bandwidth / 1e9:.0f} | "
              f"{100 * bandwidth / peaks.hbm_bytes_per_second:.0f}% | {flop_rate / 1e12:.1f} | "
              f"{100 * flop_rate / peaks.bf16_flops:.1f}% | {difference} |")
    if "bf16_error" in r:
        print(f"{head} bf16 | failed: {r['bf16_error']} | | | | | | | |")
    sys.stdout.flush()


def interpret_smoke() -> None:
    """The kernel at a tiny shape in Mosaic GPU interpret mode, against the reference (CPU)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rng = np.random.default_rng(0)
    experts, n, k, rows = 4, 128, 192, 10
    problem = dict(
        lhs=jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16),
        group_sizes=jnp.asarray([3, 0, 6, 1], jnp.int32),
        blocks=jnp.asarray(rng.integers(0, 256, (experts, n, k // 32, 16), dtype=np.uint8)),
        scales=jnp.asarray(rng.integers(118, 130, (experts, n, k // 32), dtype=np.uint8)),
        bias=jnp.asarray(rng.standard_normal((experts, n)), jnp.bfloat16),
    )
    for epilogue in ("bias", "bias_swiglu"):
        out = mxfp4_grouped_matmul(**problem, epilogue=epilogue, config=Config(block_kb=32,
                                   decoded_lhs="smem", e2m1_decode="select"), interpret=plgpu.InterpretGPUParams())
        ref = mxfp4_grouped_matmul_reference(**problem, epilogue=epilogue)
        diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        print(f"interpret {epilogue}: out {out.shape} {out.dtype}, max |kernel - xla| = {diff:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 4096])
    parser.add_argument("--models", nargs="+", choices=sorted(EXPERTS), default=["20b", "120b"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--interpret", action="store_true", help="tiny CPU smoke run instead")
    parser.add_argument("--mma", action="store_true",
                        help="time the mma.sync expert kernel (as this GPU and as an sm_80 lowers it) beside the "
                             "WGMMA kernel and the XLA reference instead")
    parser.add_argument("--sweep", action="store_true",
                        help="time the kernel alone over the tuning configs of SWEEP instead (one "
                             "model and a few token counts per call: each config compiles)")
    args = parser.parse_args()
    if args.interpret:
        interpret_smoke()
        return
    device = jax.devices()[0]
    if device.platform != "gpu":
        sys.exit(f"moe_kernel.py needs a GPU (found {device.platform}); use --interpret on a CPU.")
    peaks = device_peaks(device)
    if peaks is None:
        sys.exit(f"no peak figures for {device.device_kind!r}; add them to gpu_measure.PEAKS")
    print(f"device: {device.device_kind}, peaks: {peaks.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
          f"{peaks.hbm_bytes_per_second / 1e12:.2f} TB/s HBM; jax {jax.__version__}\n")
    # One case's operands at a time (120b's experts take 1 GB per matmul).
    cases = (Case.make(model, tokens, matmul)
             for model in args.models for tokens in args.tokens for matmul in ("mlp1", "mlp2"))
    if args.sweep:
        for case in cases:
            print_sweep(case, sweep(case, args.iters), peaks)
        return
    print_table_header()
    for case in cases:
        print_case_rows((bench_mma if args.mma else bench)(case, args.iters), peaks)


if __name__ == "__main__":
    main()
