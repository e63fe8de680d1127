"""Expert weights saved dense (bfloat16, float16 or float32), quantized to MXFP4 as they are read.

Fine-tuning recipes save gpt-oss with dense experts: transformers after
``Mxfp4Config(dequantize=True)``, TRL, Unsloth, PEFT LoRA merged into the model. In Hugging
Face's layout each layer then holds two tensors in place of the MXFP4 ``blocks`` and ``scales``:

* ``mlp.experts.gate_up_proj`` ``[E, H, 2I]``, gate and up interleaved on the last axis, as the
  model's ``mlp1_weight`` rows are;
* ``mlp.experts.down_proj`` ``[E, I, H]``.

Each expert's matrix is the transpose of the model's ``[E, N, K]`` (N outputs, K the contraction
axis that MXFP4 blocks run along): transformers decodes ``blocks [E, N, K/32, 16]`` to
``[E, N, K]`` and swaps the last two axes, so quantizing forms the blocks along the dense
tensor's axis 1 and lays them out with K last. A dequantized
save thus quantizes back to the values it was decoded from (byte for byte wherever a block's
largest element is 4 or 6 times its scale, as the OCP rule always makes it; see
:func:`pallas_kernels.mxfp4.quantize`).

Quantizing streams: a few experts at a time are read from disk and quantized on JAX's default
device (the GPU when there is one), so memory stays near one MXFP4 tensor plus a chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.checkpoints.folder import CheckpointError
from gptoss_jax.config import GptOssConfig
from pallas_kernels import mxfp4

# The model's expert weight -> its dense tensor in Hugging Face's layout (after "model.layers.{i}.").
DENSE_EXPERT_NAMES = {
    "mlp.mlp1_weight": "mlp.experts.gate_up_proj",
    "mlp.mlp2_weight": "mlp.experts.down_proj",
}
DENSE_DTYPES = ("BF16", "F16", "F32")
"""The safetensors dtypes dense expert weights are read in."""

# Bytes of dense weights quantized in one step: large enough to keep the device busy, small
# enough that the step's float32 temporaries stay a few hundred MB.
CHUNK_BYTES = 64 * 2**20


def expert_weight(path: str) -> str | None:
    """``block.0.mlp.mlp1_weight.blocks`` (or ``.scales``) -> ``block.0.mlp.mlp1_weight``; else None."""
    weight, _, part = path.rpartition(".")
    if part in ("blocks", "scales") and weight.endswith(tuple(DENSE_EXPERT_NAMES)):
        return weight
    return None


def dense_name(weight: str) -> str:
    """``block.3.mlp.mlp1_weight`` -> ``model.layers.3.mlp.experts.gate_up_proj``."""
    _, layer, suffix = weight.split(".", 2)
    return f"model.layers.{layer}.{DENSE_EXPERT_NAMES[suffix]}"


def dense_shape(config: GptOssConfig, weight: str) -> tuple[int, int, int]:
    """``[E, K, N]`` of a dense expert tensor: ``[E, H, 2I]`` for mlp1, ``[E, I, H]`` for mlp2."""
    if weight.endswith("mlp1_weight"):
        return config.num_experts, config.hidden_size, 2 * config.intermediate_size
    return config.num_experts, config.intermediate_size, config.hidden_size


def experts_per_chunk(shape: tuple[int, int, int], itemsize: int) -> int:
    """The most experts, dividing E (so every step has one shape: one compilation), within CHUNK_BYTES."""
    experts, rows, columns = shape
    fitting = max(1, CHUNK_BYTES // (rows * columns * itemsize))
    return max(count for count in range(1, experts + 1) if experts % count == 0 and count <= fitting)


@jax.jit
def _quantize_chunk(dense: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dense experts ``[e, K, N]`` -> blocks ``[e, N, K/32, 16]``, scales ``[e, N, K/32]``, and
    whether each expert's weights are all finite (bool ``[e]``). bfloat16 comes as its uint16
    bits: JAX takes a NumPy bfloat16 array in at a fraction of the speed of its bits."""
    if dense.dtype == jnp.uint16:
        dense = jax.lax.bitcast_convert_type(dense, jnp.bfloat16)
    blocks, scales, finite_blocks = mxfp4.quantize(dense, axis=1)  # blocks along K, laid out K last
    return blocks, scales, jnp.all(finite_blocks, axis=(1, 2))


def quantize_dense_experts(
    read_experts: Callable[[slice], np.ndarray], shape: tuple[int, int, int], dtype: np.dtype, where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a dense expert tensor to MXFP4, a chunk of experts at a time.

    Args:
      read_experts: returns the experts ``[e, K, N]`` a slice of the first axis selects.
      shape: ``[E, K, N]`` of the whole tensor.
      dtype: its dtype (bfloat16, float16 or float32), which sets the chunk size.
      where: how error messages name the tensor (its file and name).

    Returns:
      ``(blocks uint8 [E, N, K/32, 16], scales uint8 [E, N, K/32])`` on the host.

    Raises:
      CheckpointError: a weight is NaN or infinite (the message names the tensor and expert).
    """
    experts, contraction, outputs = shape
    groups = contraction // mxfp4.BLOCK_SIZE
    blocks = np.empty((experts, outputs, groups, mxfp4.BYTES_PER_BLOCK), np.uint8)
    scales = np.empty((experts, outputs, groups), np.uint8)
    step = experts_per_chunk(shape, np.dtype(dtype).itemsize)
    for first in range(0, experts, step):
        chunk = slice(first, first + step)
        dense = read_experts(chunk)
        if dense.dtype == jnp.bfloat16:
            dense = dense.view(np.uint16)
        chunk_blocks, chunk_scales, finite = _quantize_chunk(jax.device_put(dense))
        finite = np.asarray(finite)
        if not finite.all():
            raise CheckpointError(
                f"{where}: expert {first + int(np.argmin(finite))} holds NaN or infinite weights, "
                "which MXFP4 cannot encode"
            )
        blocks[chunk], scales[chunk] = np.asarray(chunk_blocks), np.asarray(chunk_scales)
    return blocks, scales


@jax.jit
def _dense_expert(blocks: jax.Array, scales: jax.Array) -> jax.Array:
    return mxfp4.dequantize(blocks, scales, jnp.float32).T


def dense_from_mxfp4(blocks: np.ndarray, scales: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The dense tensor transformers saves for MXFP4 experts: the inverse of :func:`quantize_dense_experts`.

    Args:
      blocks: uint8 ``[E, N, K/32, 16]``.
      scales: uint8 ``[E, N, K/32]``.
      dtype: bfloat16, float16 or float32 (every finite MXFP4 value is exact in bfloat16 and
        float32; in float16 where its scale fits).

    Returns:
      ``[E, K, N]`` in ``dtype``, decoded one expert at a time.
    """
    experts, outputs, groups, _ = blocks.shape
    dense = np.empty((experts, groups * mxfp4.BLOCK_SIZE, outputs), dtype)
    for expert in range(experts):
        # float32 on the device, cast on the host: NumPy's cast keeps subnormal values.
        dense[expert] = np.asarray(_dense_expert(blocks[expert], scales[expert])).astype(dtype)
    return dense
