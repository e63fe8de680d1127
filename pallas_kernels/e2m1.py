"""E2M1 (FP4) nibbles to bf16 inside a Mosaic GPU kernel: Hopper has no FP4 conversions, so the
expert matmul decodes with integer and bit operations. Three forms, chosen by
:attr:`pallas_kernels.mxfp4_moe.Config.e2m1_decode`:

* ``"select"`` (:func:`select_decode`): exact anywhere, integer operations only; interpret mode's,
  since XLA on the CPU flushes subnormal bf16 to zero.
* ``"multiply"`` (:func:`times_two_pow_minus_126`): a code's exponent and mantissa bits go to the
  bottom of a bf16 exponent field, which gives the value times 2**-126 (a subnormal for 0.5),
  as triton_kernels' Hopper MXFP4 path does; a bf16 multiply restores the value where
  subnormals are kept, as by the GPU's bf16 arithmetic. Written on uint16 tiles, which Mosaic
  GPU holds as ``vector<2xi16>`` registers: LLVM splits most of those operations into two
  16-bit ones and widens the bytes first, about 15 instructions per weight byte (the SASS of
  ``python -m benchmarks.kernels.kernel_sass --sass DIR``).
* ``"word"`` (:func:`times_two_pow_minus_126_words`): the same bits, built on whole 32-bit words
  inside :func:`plgpu.inline_mgpu`: a register's two bytes are spread into the two 16-bit lanes
  of a word (one ``prmt``), and each nibble's bits reach their bf16 places with one mask, one
  multiply by a two-bit constant and one mask (:func:`byte_pair_to_bf16_words`): 3.5 integer
  instructions per byte for both halves, then the same multiplies by 2**126 and by the scale
  (:func:`scale_bits`), on words of two bf16 (2 per byte), or one multiply by both where the
  scale allows (:func:`folded_scale_bits`: ``2**(s - 1)`` is a bf16 only for s in 1..128, which
  :func:`scales_fold` checks). Interpret mode cannot run ``inline_mgpu``; the
  integer steps are written once, against an :class:`WordOps`, and the tests run them in NumPy
  over all 256 bytes against ``ml_dtypes``.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm

TWO_POW_126 = 2.0**126  # a Python float, exact in bf16: a tile multiplied by it keeps its dtype


def select_decode(codes: jax.Array) -> jax.Array:
    """uint16 E2M1 codes (low 4 bits) -> exact bf16 values, with integer ops only.

    For a magnitude code c >= 2 (exponent field e >= 1) the bf16 bits are exponent e + 126 and
    mantissa bit m, i.e. ``(c << 6) + 0x3F00``. Codes 0 and 1 (0 and 0.5) are selected directly,
    which avoids the subnormal intermediate of :func:`times_two_pow_minus_126`.
    """
    magnitude = codes & 7
    bits = jnp.where(magnitude >= 2, (magnitude << 6) + 0x3F00, magnitude * 0x3F00)
    bits = bits | ((codes & 8) << 12)
    return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)


def times_two_pow_minus_126(packed: jax.Array, nibble: int) -> jax.Array:
    """uint16 packed bytes -> bf16 ``value * 2**-126`` of their low (0) or high (1) nibble.

    The code's two exponent bits and its mantissa bit become the lowest bits of the bf16
    exponent field and the top mantissa bit, and its sign the sign: exponent field e gives
    ``(1 + m/2) * 2**(e - 127)`` for e >= 1 and the subnormal ``(m/2) * 2**-126`` for e = 0,
    each the E2M1 value times 2**-126. Multiplying by 2**126 is then exact where subnormal inputs
    are kept, as by the GPU's bf16 arithmetic.
    """
    shift = 4 * nibble
    magnitude = (packed & (0x7 << shift)) << (6 - shift)
    sign = (packed & (0x8 << shift)) << (12 - shift)
    return lax.bitcast_convert_type(magnitude | sign, jnp.bfloat16)


Word = TypeVar("Word")


class WordOps(Protocol[Word]):
    """The 32-bit operations of :func:`byte_pair_to_bf16_words`, on one kind of word."""

    def prmt(self, word: Word, selector: int) -> Word:
        """PTX ``prmt.b32 d, word, 0, selector`` (default mode): byte i of d is byte
        ``(selector >> 4i) & 7`` of the 8 bytes ``{0, word}`` (``word`` bytes 0-3, zeros 4-7)."""

    def and_(self, word: Word, mask: int) -> Word: ...

    def mul(self, word: Word, factor: int) -> Word:
        """The low 32 bits of the product."""


# prmt selector: the pair's byte 0 to the low byte of lane 0, byte 1 to the low byte of lane 1,
# zeros (byte 4 of {0, word}) above them.
SPREAD_PAIR = 0x4140
LOW_NIBBLES = 0x000F000F
HIGH_NIBBLES = 0x00F000F0
# A multiply by two set bits is two disjoint shifted copies of the 4-bit nibble: the one that
# lands bits 0-2 on bf16 bits 6-8 (top mantissa bit, two lowest exponent bits) and the one that
# lands bit 3 (the sign) on bit 15. Disjoint, so no carries; the mask keeps those four bits.
LOW_NIBBLE_TO_BF16 = (1 << 6) | (1 << 12)
HIGH_NIBBLE_TO_BF16 = (1 << 2) | (1 << 8)
BF16_BITS_OF_E2M1 = 0x81C081C0


def byte_pair_to_bf16_words(pair: Word, ops: WordOps[Word]) -> tuple[Word, Word]:
    """Two packed bytes (bits 0-15 of ``pair``, the rest 0) -> two words of two bf16 each:
    ``value * 2**-126`` of their low nibbles (the even-K half) and of their high nibbles (the
    odd-K half), byte 0's in the low lane. 7 operations."""
    lanes = ops.prmt(pair, SPREAD_PAIR)
    even = ops.and_(ops.mul(ops.and_(lanes, LOW_NIBBLES), LOW_NIBBLE_TO_BF16), BF16_BITS_OF_E2M1)
    odd = ops.and_(ops.mul(ops.and_(lanes, HIGH_NIBBLES), HIGH_NIBBLE_TO_BF16), BF16_BITS_OF_E2M1)
    return even, odd


class _MlirWordOps:
    """:class:`WordOps` on MLIR i32 values, inside :func:`plgpu.inline_mgpu`."""

    def __init__(self):
        self.i32 = ir.IntegerType.get_signless(32)

    def prmt(self, word: ir.Value, selector: int) -> ir.Value:
        return llvm.inline_asm(self.i32, [word], f"prmt.b32 $0, $1, 0, {selector:#x};", "=r,r")

    def and_(self, word: ir.Value, mask: int) -> ir.Value:
        return arith.andi(word, mgpu.utils.c(mask, self.i32))

    def mul(self, word: ir.Value, factor: int) -> ir.Value:
        return arith.muli(word, mgpu.utils.c(factor, self.i32))


def times_two_pow_minus_126_words(
    packed: jax.Array, layout: Any = plgpu.Layout.WGMMA  # a plgpu.Layout, plain or parameterized
) -> tuple[jax.Array, jax.Array]:
    """uint8 packed bytes ``[rows, cols]`` in a register ``layout`` -> the bf16
    ``value * 2**-126`` of their low nibbles and of their high nibbles, ``[rows, cols]`` each in
    the same layout (so the decoded halves feed the MMA as register operands directly).

    The layout must give each thread pairs of adjacent columns, one ``vector<2xi8>`` register
    per pair, as WGMMA's and ``mma.sync``'s A-operand layouts for bf16 do: each register becomes
    one word of each half, with nothing moved between threads.
    """
    half = plgpu.ShapeDtypeStruct(packed.shape, jnp.bfloat16, layout=layout)

    @plgpu.inline_mgpu(arg_types=(layout,), return_type=(half, half))
    def decode(_, fragments: mgpu.FragmentedArray):
        ops = _MlirWordOps()
        i16 = ir.IntegerType.get_signless(16)
        bf16_pair = ir.VectorType.get((2,), ir.BF16Type.get())
        even, odd = np.empty_like(fragments.registers), np.empty_like(fragments.registers)
        for index, register in np.ndenumerate(fragments.registers):
            pair = arith.extui(ops.i32, mgpu.utils.bitcast(register, i16))
            even_word, odd_word = byte_pair_to_bf16_words(pair, ops)
            even[index] = mgpu.utils.bitcast(even_word, bf16_pair)
            odd[index] = mgpu.utils.bitcast(odd_word, bf16_pair)
        return tuple(mgpu.FragmentedArray(_registers=r, _layout=fragments.layout, _is_signed=None)
                     for r in (even, odd))

    return decode(packed)


def scale_bits(scale_bytes: jax.Array) -> jax.Array:
    """uint16 E8M0 scale bytes s -> bf16 ``2**(s - 127)`` (0 for s = 0): the byte is exactly the
    exponent field of the power of two."""
    return lax.bitcast_convert_type(scale_bytes << 7, jnp.bfloat16)


# 2**(s - 1) is a bf16 for s in 1..128 (exponent field s + 126 <= 254; s = 0, the zero scale,
# has no such power of two).
FOLDABLE_SCALES = (1, 128)


def folded_scale_bits(scale_bytes: jax.Array) -> jax.Array:
    """uint16 E8M0 scale bytes s in :data:`FOLDABLE_SCALES` -> bf16 ``2**126 * 2**(s - 127) =
    2**(s - 1)``: one multiply of a ``value * 2**-126`` tile by it both restores and scales the
    values. Exact: the product ``value * 2**(s - 127)`` has at most two significant bits and lies
    in [2**-127, 6 * 2**1], a bf16 (normal, or subnormal for 2**-127), as the two multiplies
    give. Other s would need a power of two past bf16's range."""
    return lax.bitcast_convert_type((scale_bytes + 126) << 7, jnp.bfloat16)  # exponent field s + 126


def scales_fold(scale_bytes: jax.Array) -> jax.Array:
    """Whether every scale byte is in :data:`FOLDABLE_SCALES` (a bool scalar): one max, of the
    bytes as uint16 less 1 (0 wraps to 65535)."""
    low, high = FOLDABLE_SCALES
    return jnp.max(scale_bytes.astype(jnp.uint16) - low) <= high - low
