"""The Pallas Mosaic-GPU MXFP4 grouped matmul against its XLA reference.

Without a GPU, two kinds of checks:

* Interpret mode (``plgpu.InterpretGPUParams``) runs the kernel body on the CPU. It cannot run
  WGMMA with a register LHS, and XLA on the CPU flushes the subnormal bf16 of the GPU's nibble
  decoding, so there the tests use ``decoded_lhs="smem"`` and ``e2m1_decode="select"``: the
  variant that stores the decoded weight tile to shared memory first and decodes with integer
  operations only, and is otherwise the same code. The GPU decoding's bit patterns are checked
  exactly with NumPy, which keeps subnormals.
* ``jax.export`` for ``cuda`` runs the whole Mosaic GPU lowering (layout inference, TMA and
  WGMMA checks) for sm_90 at the real gpt-oss shapes, with the GPU default (register LHS).

On a Hopper GPU the same tests also run compiled with the register LHS (``kernel_mode="gpu"``,
see conftest.py), and the gpt-oss shapes run for real. Interpret mode is slow, so its shapes are
small except one gpt-oss-sized case per epilogue.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from moe_cases import HIDDEN, mxfp4_problem

from pallas_kernels import e2m1, mxfp4
from pallas_kernels.mxfp4_moe import Config, Tasks, mxfp4_grouped_matmul
from pallas_kernels.mxfp4_moe_reference import (
    KERNEL_EXACT_FRACTION,
    KERNEL_RTOL,
    SWIGLU_LIMIT,
    few_rows_product,
    mxfp4_grouped_matmul_reference,
)

INTERPRET = plgpu.InterpretGPUParams()


def _check(problem, kernel_mode, *, config=Config(), epilogue="bias", row_weights=None, swiglu_limit=SWIGLU_LIMIT):
    """Run the kernel (interpreted with the decoded tile in shared memory and the integer-only
    decode, or compiled as ``config`` says) and compare with the reference; returns the output."""
    interpreted = kernel_mode == "interpret"
    if interpreted:
        config = dataclasses.replace(config, decoded_lhs="smem", e2m1_decode="select")
    out = mxfp4_grouped_matmul(
        **problem, epilogue=epilogue, swiglu_limit=swiglu_limit, row_weights=row_weights, config=config,
        interpret=INTERPRET if interpreted else None,
    )
    ref = mxfp4_grouped_matmul_reference(**problem, epilogue=epilogue, swiglu_limit=swiglu_limit,
                                         row_weights=row_weights)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_allclose(out, ref, rtol=KERNEL_RTOL, atol=1e-30)
    assert np.mean(out == ref) > KERNEL_EXACT_FRACTION
    return out


def test_decode_e2m1_is_exact_for_every_code():
    codes = jnp.arange(16, dtype=jnp.uint16)
    decoded = np.asarray(jax.jit(e2m1.select_decode)(codes), np.float32)
    np.testing.assert_array_equal(decoded, mxfp4.E2M1_VALUES)
    assert np.all(np.signbit(decoded) == np.signbit(mxfp4.E2M1_VALUES))


@pytest.mark.parametrize("nibble", [0, 1], ids=["low", "high"])
def test_gpu_decode_is_exact_for_every_byte_where_subnormals_are_kept(nibble):
    """The GPU's decoding (e2m1_decode="multiply") builds ``value * 2**-126``, a subnormal bf16
    for 0.5, then multiplies by 2**126. Its bits come from XLA here (integer operations and a
    bitcast only); the multiply runs in NumPy, which keeps subnormals, as the GPU's bf16 does."""
    packed = np.arange(256, dtype=np.uint16)
    scaled_down = np.asarray(jax.jit(e2m1.times_two_pow_minus_126, static_argnums=1)(packed, nibble))
    decoded = scaled_down.astype(np.float64) * 2.0**126
    codes = (packed >> (4 * nibble)) & 0xF
    np.testing.assert_array_equal(decoded, mxfp4.E2M1_VALUES[codes])
    assert np.all(np.signbit(decoded) == np.signbit(mxfp4.E2M1_VALUES[codes]))
    # Where subnormals are flushed (XLA on the CPU), 0.5 would decode as 0: why interpret mode
    # takes e2m1_decode="select".
    assert np.count_nonzero(scaled_down.view(np.uint16) & 0x7F80 == 0) == 64  # codes 0, 1, 8, 9


class _NumpyWordOps:
    """:class:`pallas_kernels.e2m1.WordOps` on uint32 arrays, as PTX defines the operations."""

    def prmt(self, word, selector):
        result = np.zeros_like(word)
        for i in range(4):
            digit = (selector >> (4 * i)) & 0xF
            byte = (word.astype(np.uint64) >> (8 * (digit & 7))) & 0xFF  # bytes 4-7 of {0, word}: 0
            if digit & 8:  # sign-replicate mode
                byte = np.where(byte & 0x80, 0xFF, 0).astype(np.uint64)
            result |= (byte << (8 * i)).astype(np.uint32)
        return result

    def and_(self, word, mask):
        return word & np.uint32(mask)

    def mul(self, word, factor):
        return word * np.uint32(factor)  # uint32 arithmetic: the low 32 bits, as mul.lo.u32


def _e2m1(codes):
    return codes.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)


def test_word_decode_steps_are_exact_for_every_byte_pair():
    """e2m1_decode="word" runs only as inline Mosaic GPU code, which interpret mode cannot run:
    its integer steps, the same function the kernel emits, run here in NumPy over every pair of
    bytes (so every byte in both places of a register), against ml_dtypes' float4_e2m1fn. The
    multiply by 2**126 runs in float64, which keeps the subnormal of 0.5 as the GPU's bf16 does."""
    pairs = np.arange(1 << 16, dtype=np.uint32)
    words = e2m1.byte_pair_to_bf16_words(pairs, _NumpyWordOps())
    for nibble, word in enumerate(words):
        for lane in range(2):
            bits = ((word >> (16 * lane)) & 0xFFFF).astype(np.uint16)
            decoded = bits.view(ml_dtypes.bfloat16).astype(np.float64) * 2.0**126
            codes = (pairs >> (8 * lane + 4 * nibble)) & 0xF
            np.testing.assert_array_equal(decoded, _e2m1(codes))
            np.testing.assert_array_equal(np.signbit(decoded), np.signbit(_e2m1(codes)))


def test_folded_scales_restore_and_scale_in_one_exact_multiply():
    """fold_scales: a word-decoded ``value * 2**-126`` times ``2**(s - 1)`` is the value times
    ``2**(s - 127)`` exactly, for every code and every foldable s, the product rounded to bf16
    (in NumPy, which keeps subnormals as the GPU does); and which tiles fold."""
    low, high = e2m1.FOLDABLE_SCALES
    scales = np.arange(low, high + 1, dtype=np.uint16)
    factors = np.asarray(jax.jit(e2m1.folded_scale_bits)(scales), np.float64)
    np.testing.assert_array_equal(factors, 2.0 ** (scales - 1.0))
    codes = np.arange(16, dtype=np.uint32)
    lanes = (codes | (codes << 16)).astype(np.uint32)  # both lanes, low nibbles
    bits = (_NumpyWordOps().mul(lanes & np.uint32(e2m1.LOW_NIBBLES), e2m1.LOW_NIBBLE_TO_BF16)
            & np.uint32(e2m1.BF16_BITS_OF_E2M1) & 0xFFFF).astype(np.uint16)
    decoded = bits.view(ml_dtypes.bfloat16).astype(np.float64)
    product = (decoded[:, None] * factors[None, :]).astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(product, _e2m1(codes)[:, None] * 2.0 ** (scales[None, :] - 127.0))
    fold = jax.jit(e2m1.scales_fold)
    assert fold(jnp.asarray([1, 77, 128], jnp.uint8)) and not fold(jnp.asarray([1, 129], jnp.uint8))
    assert not fold(jnp.asarray([0, 77], jnp.uint8))  # the zero scale has no 2**(s - 1)


def test_numpy_prmt_follows_ptx():
    # The emulation's own check, on PTX's documented example bytes: {b, a} = 0x_77665544_33221100.
    word = np.array([0x33221100], np.uint32)
    assert _NumpyWordOps().prmt(word, 0x3210)[0] == 0x33221100
    assert _NumpyWordOps().prmt(word, 0x4140)[0] == 0x00110000
    assert _NumpyWordOps().prmt(np.array([0x80], np.uint32), 0x4448)[0] == 0x000000FF


@pytest.mark.parametrize("form", ["per_row", "by_expert"], ids=["per-row (CPU)", "by-expert (other backends)"])
def test_reference_few_rows_product_against_float64(form):
    # The reference picks its decode-sized form by backend, so the CPU runs only one of them
    # inside it: both are checked here, on the CPU. Expert 4 has two rows (decoded once by
    # expert), experts 1-3 none; the last row is past the groups (expert 5 of 5).
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((5, 48, 64)).astype(np.float32)
    lhs = rng.standard_normal((4, 64)).astype(np.float32)
    expert = np.array([0, 4, 4, 5], np.int32)
    got = few_rows_product(jnp.asarray(lhs), jnp.asarray(expert), lambda e: jnp.asarray(weights)[e], 5, form=form)
    want = np.einsum("mk,mnk->mn", lhs[:3].astype(np.float64), weights[expert[:3]].astype(np.float64))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got)[:3], want, rtol=1e-5, atol=1e-5)
    if form == "by_expert":  # no expert decoded for the row past the groups
        assert not np.asarray(got)[3].any()


@pytest.mark.parametrize("tokens", [1, 8])
def test_reference_few_rows_forms_at_real_shapes(tokens):
    # gpt-oss-20b's mlp2 shapes in bf16, routed as the model routes (each token's top-4 distinct
    # experts, rows sorted by expert). The forms sum in float32 in different orders, so each is
    # held to float64 within float32's accumulation error, relative to the terms' magnitudes;
    # a row multiplied by another expert's weights would be off by about its whole magnitude.
    rng = np.random.default_rng(tokens)
    experts, top_k, n, k = 32, 4, 2880, 2880
    expert = np.sort(np.concatenate([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]))
    blocks = jnp.asarray(rng.integers(0, 256, (experts, n, k // 32, 16), np.uint8))
    scales = jnp.asarray(rng.integers(120, 130, (experts, n, k // 32), np.uint8))
    lhs = jnp.asarray(rng.standard_normal((tokens * top_k, k)), jnp.bfloat16)

    @functools.partial(jax.jit, static_argnames="form")
    def product(lhs, expert, form):
        weights_of = lambda e: mxfp4.dequantize(blocks[e], scales[e], jnp.bfloat16)  # noqa: E731
        return few_rows_product(lhs, expert, weights_of, experts, form=form)

    want, magnitude = np.zeros((len(expert), n)), np.zeros((len(expert), n))
    for row, e in enumerate(expert):  # a row at a time: [N, K] float64 terms
        terms = np.asarray(lhs[row], np.float64) * np.asarray(mxfp4.dequantize(blocks[e], scales[e], jnp.float32))
        want[row], magnitude[row] = terms.sum(-1), np.abs(terms).sum(-1)
    for form in ("per_row", "by_expert"):
        error = np.abs(np.asarray(product(lhs, jnp.asarray(expert), form), np.float64) - want)
        assert (error <= 1e-6 * magnitude).all(), (form, (error / magnitude).max())


@pytest.mark.parametrize("rows, group_sizes", [(120, [37, 0, 5, 70, 0, 1]), (4, [1, 0, 2, 0, 0, 0])],
                         ids=["row-tiles", "few-rows"])
def test_reference_against_float64(rows, group_sizes):
    # Row tiles of 32 (120 rows, 6 experts): two tiles for 37 rows and three for 70, each
    # expert's last tile running into the next one's rows or past the groups (7 rows past them).
    # Then the decode-sized path (no more rows than experts), one row past the groups.
    problem, row_weights = mxfp4_problem(rows, 64, 32, group_sizes)
    problem["lhs"] = problem["lhs"].astype(jnp.float32)
    got = mxfp4_grouped_matmul_reference(**problem, row_weights=row_weights)
    weights = np.asarray(mxfp4.dequantize(problem["blocks"], problem["scales"], jnp.float32), np.float64)
    lhs, bias = np.asarray(problem["lhs"], np.float64), np.asarray(problem["bias"], np.float64)
    expert = np.repeat(np.arange(len(group_sizes)), group_sizes)
    want = np.zeros((rows, 32))
    for row, e in enumerate(expert):
        want[row] = (weights[e] @ lhs[row] + bias[e]) * float(row_weights[row])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decode, message", [("multiply", "flushes the subnormal"), ("word", "inline Mosaic GPU")])
def test_interpret_mode_refuses_the_gpu_decodes(decode, message):
    problem, _ = mxfp4_problem(4, 192, 128, [4])
    with pytest.raises(ValueError, match=message):
        mxfp4_grouped_matmul(**problem, config=Config(decoded_lhs="smem", e2m1_decode=decode), interpret=INTERPRET)


def test_ragged_groups_with_empty_experts_and_rows_past_the_groups(kernel_mode):
    # 3 pipeline steps along K; 4 rows past sum(group_sizes) must come out as 0.
    problem, _ = mxfp4_problem(21, 192, 128, [5, 0, 9, 0, 3])
    out = _check(problem, kernel_mode, config=Config(block_kb=32))
    assert np.all(out[17:] == 0)


def test_single_token(kernel_mode):
    problem, _ = mxfp4_problem(1, 192, 128, [0, 0, 1, 0])
    _check(problem, kernel_mode, epilogue="bias_swiglu")


@pytest.mark.parametrize("group_sizes", [[0, 40, 0], [3, 37, 0]], ids=["aligned", "unaligned"])
def test_all_rows_on_one_expert_over_several_row_tiles(group_sizes, kernel_mode):
    # block_m=16: the expert's rows span 3 row tiles (4 when its first row is not 8-aligned).
    problem, row_weights = mxfp4_problem(40, 192, 128, group_sizes)
    _check(problem, kernel_mode, config=Config(block_m=16, block_kb=32), row_weights=row_weights)


@pytest.mark.parametrize("scale_source", ["smem", "global"])
def test_wide_scale_range_with_swiglu_and_row_weights(kernel_mode, scale_source):
    problem, row_weights = mxfp4_problem(12, 192, 256, [4, 5, 3], scale_range=(100, 151), seed=1)
    _check(
        problem,
        kernel_mode,
        config=Config(block_kb=32, scale_source=scale_source),
        epilogue="bias_swiglu",
        row_weights=row_weights,
    )


def _check_half_codes_under_every_scale(kernel_mode, config, top_scale=254):
    k, n = 192, 256
    blocks = np.full((1, n, k // 32, 16), 0x11, np.uint8)
    scales = 1 + (np.arange(n)[:, None] + 37 * np.arange(k // 32)) % top_scale
    picked = [(32 * j + 2 * (j % 16) + nibble, j) for j in range(k // 32) for nibble in (0, 1)]
    lhs = np.zeros((len(picked), k), np.float32)
    for row, (column, _) in enumerate(picked):
        lhs[row, column] = 1.0
    problem = dict(lhs=jnp.asarray(lhs, jnp.bfloat16), group_sizes=jnp.asarray([len(picked)], jnp.int32),
                   blocks=jnp.asarray(blocks), scales=jnp.asarray(scales[None].astype(np.uint8)),
                   bias=jnp.zeros((1, n), jnp.bfloat16))
    out = np.asarray(_check(problem, kernel_mode, config=dataclasses.replace(config, block_kb=32)), np.float64)
    want = np.stack([0.5 * 2.0 ** (scales[:, j] - 127.0) for _, j in picked])
    if kernel_mode == "interpret":
        want[want < 2.0**-126] = 0  # XLA on the CPU flushes the one subnormal product, s = 1's
    else:
        assert np.any(want == 2.0**-127)
    np.testing.assert_array_equal(out, want)
    assert out.max() == 2.0 ** (top_scale - 128)


def test_half_codes_under_every_scale_are_exact(kernel_mode):
    """All-0x11 bytes (both nibbles 0.5, the code whose GPU decoding is a subnormal bf16) under
    every scale 1..254: one-hot rows pick single weights, so each output is exactly
    ``0.5 * 2**(s - 127)``, from the subnormal 2**-127 to 2**126. Interpret mode runs the
    integer-only decode (and XLA on the CPU flushes 2**-127)."""
    _check_half_codes_under_every_scale(kernel_mode, Config())


@pytest.mark.parametrize("top_scale", [254, 128], ids=["every-scale", "foldable-scales"])
@pytest.mark.parametrize("config", [Config(e2m1_decode=decode, scale_source=source)
                                    for decode in ("word", "multiply") for source in ("smem", "global")],
                         ids=lambda c: f"{c.e2m1_decode}-{c.scale_source}")
def test_half_codes_under_every_scale_in_every_gpu_variant(gpu, config, top_scale):
    """Scales up to 128 let the default (word decode, scales in shared memory) fold them."""
    _check_half_codes_under_every_scale("gpu", config, top_scale)


def test_swiglu_limit_of_the_config(kernel_mode):
    # Not gpt-oss's 7.0, and no bf16 number: the reference's bf16 arithmetic clamps at 3.296875.
    problem, _ = mxfp4_problem(6, 192, 256, [2, 4], seed=4)
    clamped = _check(problem, kernel_mode, config=Config(block_kb=32), epilogue="bias_swiglu", swiglu_limit=3.3)
    gpt_oss = mxfp4_grouped_matmul_reference(**problem, epilogue="bias_swiglu")
    assert np.mean(clamped != np.asarray(gpt_oss, np.float32)) > 0.1  # the limit reached the clamps


def test_gpt_oss_first_expert_matmul_shape(kernel_mode):
    # K=2880, N=5760 (gate and linear interleaved), 2 experts, one of them empty.
    problem, _ = mxfp4_problem(2, HIDDEN, 2 * HIDDEN, [0, 2], seed=2)
    _check(
        problem,
        kernel_mode,
        config=Config(block_kb=160, max_concurrent_steps=2),
        epilogue="bias_swiglu",
    )


def test_gpt_oss_second_expert_matmul_shape(kernel_mode):
    # K=2880, N=2880, 2 experts (the second one empty), routing weights.
    problem, row_weights = mxfp4_problem(3, HIDDEN, HIDDEN, [3, 0], seed=3)
    _check(
        problem,
        kernel_mode,
        config=Config(block_kb=160, max_concurrent_steps=2),
        row_weights=row_weights,
    )


@pytest.mark.parametrize("tokens", [1, 8, 64, 4096], ids=lambda t: f"tokens{t}")
@pytest.mark.parametrize(
    "n, epilogue", [(2 * HIDDEN, "bias_swiglu"), (HIDDEN, "bias")], ids=["mlp1", "mlp2"]
)
@pytest.mark.parametrize("scale_range", [(112, 129), (120, 140)], ids=["scales-fold", "some-tiles-unfolded"])
def test_gpt_oss_20b_shapes_on_the_gpu(gpu, tokens, n, epilogue, scale_range):
    """32 experts, top-4 routing of random tokens, the default config: what the model runs, with
    every CTA's scales folding (as gpt-oss's) and with most of them not."""
    rng = np.random.default_rng(tokens)
    experts = rng.permuted(np.tile(np.arange(32), (tokens, 1)), axis=1)[:, :4]
    group_sizes = np.bincount(experts.ravel(), minlength=32)
    problem, row_weights = mxfp4_problem(tokens * 4, HIDDEN, n, group_sizes, scale_range=scale_range, seed=tokens)
    _check(problem, "gpu", epilogue=epilogue, row_weights=row_weights if epilogue == "bias" else None)


@pytest.mark.parametrize("block_m", [8, 64])
@pytest.mark.parametrize(
    "group_sizes, rows",
    [([3, 0, 6, 1], 10), ([3, 0, 6, 1], 16), ([0, 0, 0, 0], 5), ([70, 1, 0, 130], 201), ([9] * 16, 144)],
)
def test_tasks_start_on_8_row_boundaries_and_cover_each_row_once(group_sizes, rows, block_m):
    """What the GPU relies on and interpret mode would not notice: a tiled TMA load from a row
    that is not a multiple of 8 reads the wrong rows there, and a row two tasks store races."""
    tasks = Tasks(jnp.asarray(group_sizes, jnp.int32), rows, block_m)
    starts = np.asarray(tasks.block_start)
    offsets, counts, groups = np.asarray(tasks.offset), np.asarray(tasks.count), np.asarray(tasks.group)
    assert np.all(starts % 8 == 0) and np.all(starts >= 0)
    assert np.all(offsets + counts <= block_m)
    stored = np.concatenate([np.arange(s + o, s + o + c) for s, o, c in zip(starts, offsets, counts)])
    np.testing.assert_array_equal(np.sort(stored), np.arange(rows))
    experts_of_rows = np.repeat(np.arange(len(group_sizes) + 1), [*group_sizes, rows - sum(group_sizes)])
    for start, offset, count, group in zip(starts, offsets, counts, groups):
        assert np.all(experts_of_rows[start + offset:start + offset + count] == group)


def test_tasks_are_computed_without_a_loop():
    """The task metadata runs before every kernel call: no while loop (searchsorted's default)."""
    lowered = jax.jit(lambda sizes: vars(Tasks(sizes, 256, 64))).lower(jnp.zeros((128,), jnp.int32))
    assert "stablehlo.while" not in lowered.as_text()


def test_a_layers_two_matmuls_share_their_task_metadata():
    """A layer's two expert matmuls build the same Tasks (same group sizes, rows and block_m):
    XLA's common-subexpression elimination leaves one computation of them for both calls."""
    @functools.partial(jax.jit, static_argnames="matmul")
    def kernel_glue(group_sizes, rows, matmul):  # stands for the kernel call: its glue, then a use
        tasks = Tasks(group_sizes, 256, 64)
        return rows[tasks.block_start + tasks.offset].sum() * (2.0 if matmul == "mlp1" else 3.0) + tasks.count.sum()

    def one(group_sizes, rows):
        return kernel_glue(group_sizes, rows, matmul="mlp1")

    def both(group_sizes, rows):
        return kernel_glue(group_sizes, rows, matmul="mlp1") + kernel_glue(group_sizes, rows, matmul="mlp2")

    args = jnp.zeros((128,), jnp.int32), jnp.zeros((512,), jnp.float32)
    fusions = [jax.jit(f).lower(*args).compile().as_text().count(" fusion(") for f in (one, both)]
    assert fusions[1] == fusions[0] + 1  # the second matmul's own product only


def test_rejects_what_it_cannot_run():
    problem, _ = mxfp4_problem(4, 192, 128, [4])
    with pytest.raises(NotImplementedError, match="multiple of block_kb"):
        mxfp4_grouped_matmul(**problem, config=Config(block_kb=64))
    with pytest.raises(NotImplementedError, match="bfloat16"):
        mxfp4_grouped_matmul(**{**problem, "lhs": problem["lhs"].astype(jnp.float32)})
    big, _ = mxfp4_problem(256, HIDDEN, 128, [256])
    with pytest.raises(ValueError, match="shared memory"):
        jax.eval_shape(
            lambda p: mxfp4_grouped_matmul(**p, config=Config(block_m=256, max_concurrent_steps=8)), big
        )
    with pytest.raises(ValueError, match="multiple of 8"):
        Config(block_m=12)
    with pytest.raises(ValueError, match="scale_source"):
        Config(scale_source="tma")
    wide, _ = mxfp4_problem(4, 8256, 128, [4])  # K/32 = 258 scales a row: 258 TMA rows for mlp1's two halves
    with pytest.raises(NotImplementedError, match="scale_source='global'"):
        jax.eval_shape(lambda p: mxfp4_grouped_matmul(**p, epilogue="bias_swiglu"), wide)
    jax.eval_shape(lambda p: mxfp4_grouped_matmul(**p, epilogue="bias_swiglu", config=Config(scale_source="global")),
                   wide)
    many_rows = jax.ShapeDtypeStruct((600_000, 192), jnp.bfloat16)  # 75,000 tasks of 8 rows
    with pytest.raises(ValueError, match="more than the 65535 a grid axis holds"):
        jax.eval_shape(lambda lhs: mxfp4_grouped_matmul(lhs, *list(problem.values())[1:], config=Config(block_m=8)),
                       many_rows)


def _export(experts, n, rows, epilogue, config=None):
    shapes = [
        jax.ShapeDtypeStruct((rows, HIDDEN), jnp.bfloat16),
        jax.ShapeDtypeStruct((experts,), jnp.int32),
        jax.ShapeDtypeStruct((experts, n, HIDDEN // 32, 16), jnp.uint8),
        jax.ShapeDtypeStruct((experts, n, HIDDEN // 32), jnp.uint8),
        jax.ShapeDtypeStruct((experts, n), jnp.bfloat16),
    ]
    with_weights = epilogue == "bias"  # the second expert matmul takes the routing weights
    if with_weights:
        shapes.append(jax.ShapeDtypeStruct((rows,), jnp.float32))

    def fn(lhs, group_sizes, blocks, scales, bias, row_weights=None):
        return mxfp4_grouped_matmul(
            lhs, group_sizes, blocks, scales, bias,
            epilogue=epilogue, row_weights=row_weights, config=config,
        )

    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*shapes)
    out_n = n // 2 if epilogue == "bias_swiglu" else n
    assert exported.out_avals[0].shape == (rows, out_n)
    assert exported.out_avals[0].dtype == (jnp.float32 if with_weights else jnp.bfloat16)


@pytest.mark.parametrize("tokens", [1, 8, 64, 4096], ids=lambda t: f"tokens{t}")
@pytest.mark.parametrize("experts", [32, 128], ids=["20b", "120b"])
@pytest.mark.parametrize(
    "n, epilogue", [(2 * HIDDEN, "bias_swiglu"), (HIDDEN, "bias")], ids=["mlp1", "mlp2"]
)
def test_lowers_for_cuda_at_gpt_oss_shapes(tokens, experts, n, epilogue):
    _export(experts, n, tokens * 4, epilogue)  # top-4 routing: 4 rows per token


@pytest.mark.parametrize("tokens", [1, 4096], ids=lambda t: f"tokens{t}")
@pytest.mark.parametrize("n, epilogue", [(2 * HIDDEN, "bias_swiglu"), (HIDDEN, "bias")], ids=["mlp1", "mlp2"])
@pytest.mark.parametrize("config", [Config(fold_scales=False), Config(e2m1_decode="multiply"),
                                    Config(scale_source="global")],
                         ids=["unfolded-scales", "multiply-decode", "global-scales"])
def test_other_gpu_variants_lower_for_cuda_at_gpt_oss_shapes(tokens, n, epilogue, config):
    _export(128, n, tokens * 4, epilogue, config)


def test_interpret_variant_lowers_for_cuda_too():
    _export(32, 2 * HIDDEN, 8 * 4, "bias_swiglu", Config(decoded_lhs="smem", e2m1_decode="select"))
