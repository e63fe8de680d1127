"""The ``mma.sync`` MXFP4 grouped matmul (pallas_kernels/mxfp4_moe_mma.py) against its XLA reference.

Without a GPU:

* Interpret mode runs the kernel body on the CPU, with the two substitutions the kernel makes
  there (a float32 ``jnp.dot`` for ``mma.sync``, which the interpreter has no rule for, and the
  integer-only nibble decode, since XLA on the CPU flushes the word decode's subnormals), at a
  gpt-oss-sized matmul and on ragged groups. The word decode's bits are checked exactly in
  NumPy by test_mxfp4_moe_kernel.py (the same function, whatever the register layout).
* ``jax.export`` for ``cuda`` runs the whole Mosaic GPU lowering for abstract sm_80, sm_89,
  sm_100 and sm_120 devices (``cp.async`` copies before sm_90, TMA from it on) at gpt-oss-20b's shapes.
  benchmarks/kernels/kernel_sass.py takes the same cases through ptxas (in .ci/run).

On a Hopper GPU (``mma.sync`` runs there too) the gpt-oss shapes run compiled, as Hopper lowers
them (TMA) and as an sm_80 device does (``cp.async``).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from moe_cases import HIDDEN, mxfp4_problem

from benchmarks.kernels.kernel_cases import lowering_for
from pallas_kernels.mxfp4_moe_mma import Config, mxfp4_grouped_matmul_mma, tile_rows
from pallas_kernels.mxfp4_moe_reference import mxfp4_grouped_matmul_reference

INTERPRET = Config(e2m1_decode="select")


def _check(problem, *, config, epilogue="bias", row_weights=None, swiglu_limit=7.0, interpret=True, arch=None):
    """Run the kernel (interpreted, or compiled for this GPU or as ``arch`` lowers it) against the
    reference; returns the output as float32."""
    with lowering_for(arch) if arch else contextlib.nullcontext():
        out = mxfp4_grouped_matmul_mma(**problem, epilogue=epilogue, row_weights=row_weights, config=config,
                                       swiglu_limit=swiglu_limit,
                                       interpret=plgpu.InterpretGPUParams() if interpret else None)
    ref = mxfp4_grouped_matmul_reference(**problem, epilogue=epilogue, row_weights=row_weights,
                                         swiglu_limit=swiglu_limit)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    # The reference's bf16 rounding points: only the float32 summation order differs.
    np.testing.assert_allclose(out, ref, rtol=2**-7, atol=1e-30)
    assert np.mean(out == ref) > 0.99
    return out


def test_ragged_groups_with_empty_experts_and_rows_past_the_groups():
    # 3 pipeline steps; 4 rows past sum(group_sizes) come out as 0; groups not 8-row aligned.
    problem, row_weights = mxfp4_problem(21, 192, 128, [5, 0, 9, 0, 3])
    out = _check(problem, config=Config(block_kb=32, e2m1_decode="select"), row_weights=row_weights)
    assert np.all(out[17:] == 0)


@pytest.mark.parametrize("group_sizes", [[0, 40, 0], [3, 37, 0]], ids=["aligned", "unaligned"])
def test_one_expert_over_several_row_tiles_with_swiglu(group_sizes):
    # block_m=16: the expert's rows span 3 row tiles (4 when its first row is not 8-aligned), and
    # each row must come from the one task that owns it.
    problem, _ = mxfp4_problem(40, 192, 256, group_sizes, scale_range=(100, 151), seed=1)
    _check(problem, config=Config(block_m=16, block_kb=32, e2m1_decode="select"), epilogue="bias_swiglu")


def test_swiglu_limit_of_the_config():
    problem, _ = mxfp4_problem(6, 192, 256, [2, 4], seed=4)
    clamped = _check(problem, config=Config(block_kb=32, e2m1_decode="select"), epilogue="bias_swiglu",
                     swiglu_limit=3.3)
    gpt_oss = mxfp4_grouped_matmul_reference(**problem, epilogue="bias_swiglu")
    assert np.mean(clamped != np.asarray(gpt_oss, np.float32)) > 0.1  # the limit reached the clamps


def test_gpt_oss_first_expert_matmul_shape():
    # K=2880, N=5760 (gate and linear interleaved), 2 experts, one of them empty.
    problem, _ = mxfp4_problem(2, HIDDEN, 2 * HIDDEN, [0, 2], seed=2)
    _check(problem, config=Config(block_kb=160, e2m1_decode="select"), epilogue="bias_swiglu")


def test_gpt_oss_second_expert_matmul_shape():
    # K=2880, N=2880, routing weights, one expert empty.
    problem, row_weights = mxfp4_problem(3, HIDDEN, HIDDEN, [3, 0], seed=3)
    _check(problem, config=Config(block_kb=160, e2m1_decode="select"), row_weights=row_weights)


def _export(arch, n, rows, epilogue):
    shapes = [
        jax.ShapeDtypeStruct((rows, HIDDEN), jnp.bfloat16),
        jax.ShapeDtypeStruct((32,), jnp.int32),
        jax.ShapeDtypeStruct((32, n, HIDDEN // 32, 16), jnp.uint8),
        jax.ShapeDtypeStruct((32, n, HIDDEN // 32), jnp.uint8),
        jax.ShapeDtypeStruct((32, n), jnp.bfloat16),
    ]
    with_weights = epilogue == "bias"
    if with_weights:
        shapes.append(jax.ShapeDtypeStruct((rows,), jnp.float32))

    def fn(lhs, group_sizes, blocks, scales, bias, row_weights=None):
        return mxfp4_grouped_matmul_mma(lhs, group_sizes, blocks, scales, bias, epilogue=epilogue,
                                        row_weights=row_weights)

    with lowering_for(arch):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*shapes)
    text = exported.mlir_module()
    assert exported.out_avals[0].shape == (rows, n // 2 if epilogue == "bias_swiglu" else n)
    assert exported.out_avals[0].dtype == (jnp.float32 if with_weights else jnp.bfloat16)
    return text


@pytest.mark.parametrize("tokens", [1, 8, 4096], ids=lambda t: f"tokens{t}")
@pytest.mark.parametrize("n, epilogue", [(2 * HIDDEN, "bias_swiglu"), (HIDDEN, "bias")], ids=["mlp1", "mlp2"])
@pytest.mark.parametrize("arch", ["8.0", "8.9", "10.0", "12.0"], ids=["sm_80", "sm_89", "sm_100", "sm_120"])
def test_lowers_for_cuda_at_gpt_oss_20b_shapes(arch, n, epilogue, tokens):
    _export(arch, n, tokens * 4, epilogue)  # top-4 routing: 4 rows per token


def test_the_target_decides_the_copies():
    """Mosaic GPU copies with cp.async below compute capability 9.0 and with TMA from it on: the
    lowering for an abstract device of each differs there (the module carries its target)."""
    ampere, blackwell = (_export(arch, HIDDEN, 4, "bias") for arch in ("8.0", "12.0"))
    assert ampere != blackwell


def test_row_tiles_and_what_it_refuses():
    config = Config()
    assert [tile_rows(rows, config) for rows in (1, 4, 17, 32, 64, 1000)] == [16, 16, 32, 32, 64, 64]
    for bad in (dict(block_m=8), dict(block_m=24), dict(block_m=256), dict(block_kb=48),
                dict(max_concurrent_steps=0), dict(e2m1_decode="multiply")):
        with pytest.raises(ValueError):
            Config(**bad)
    problem, _ = mxfp4_problem(4, 192, 128, [4])
    with pytest.raises(ValueError, match="interpret mode cannot run"):
        mxfp4_grouped_matmul_mma(**problem, config=Config(), interpret=plgpu.InterpretGPUParams())
    with pytest.raises(NotImplementedError, match="multiple of block_kb"):
        mxfp4_grouped_matmul_mma(**problem, config=Config(block_kb=64))
    big = jax.ShapeDtypeStruct((256, HIDDEN), jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        jax.eval_shape(lambda lhs: mxfp4_grouped_matmul_mma(
            lhs, *list(mxfp4_problem(4, HIDDEN, 128, [4])[0].values())[1:],
            config=Config(block_m=128, block_kb=480)), big)


@pytest.mark.parametrize("arch", [None, "8.0"], ids=["as-hopper-lowers-it", "as-sm_80-lowers-it"])
@pytest.mark.parametrize("tokens", [1, 8, 64], ids=lambda t: f"tokens{t}")
@pytest.mark.parametrize("n, epilogue", [(2 * HIDDEN, "bias_swiglu"), (HIDDEN, "bias")], ids=["mlp1", "mlp2"])
def test_gpt_oss_20b_shapes_on_the_gpu(gpu, tokens, n, epilogue, arch):
    """32 experts, top-4 routing of random tokens, the default config (word decode, mma.sync)."""
    rng = np.random.default_rng(tokens)
    experts = rng.permuted(np.tile(np.arange(32), (tokens, 1)), axis=1)[:, :4]
    group_sizes = np.bincount(experts.ravel(), minlength=32)
    problem, row_weights = mxfp4_problem(tokens * 4, HIDDEN, n, group_sizes, seed=tokens)
    _check(problem, config=Config(), epilogue=epilogue, row_weights=row_weights if epilogue == "bias" else None,
           interpret=False, arch=arch)
