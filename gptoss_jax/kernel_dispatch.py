"""Choice between the Pallas Mosaic-GPU kernels and their plain-XLA references.

``auto`` takes the kernels on Hopper-or-newer NVIDIA GPUs and the references elsewhere;
``pallas`` and ``xla`` force either; ``interpret`` runs the kernels in Mosaic GPU interpret
mode on the CPU (slow; for testing the kernel path without a GPU). The environment variable
``GPTOSS_JAX_KERNELS`` overrides ``auto``; an explicit ``kernels=`` argument overrides both.
"""

from __future__ import annotations

import os
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from gptoss_jax.config import GptOssConfig
from pallas_kernels import mxfp4_moe
from pallas_kernels.cuda_toolchain import cuda_miscompiles_attention_masks

KernelChoice = Literal["auto", "pallas", "xla", "interpret"]
ENV_VAR = "GPTOSS_JAX_KERNELS"
_CHOICES = ("auto", "pallas", "xla", "interpret")
_MIN_COMPUTE_CAPABILITY = 9.0  # WGMMA and TMA


def has_hopper_gpu() -> bool:
    """Whether the default device is an NVIDIA GPU with WGMMA and TMA (sm_90 or newer)."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return False
    try:
        return float(device.compute_capability) >= _MIN_COMPUTE_CAPABILITY
    except (AttributeError, ValueError):
        return False


def resolve_kernels(choice: KernelChoice = "auto") -> Literal["pallas", "xla", "interpret"]:
    """Turn ``auto`` into ``pallas`` or ``xla``; reject unknown names."""
    if choice not in _CHOICES:
        raise ValueError(f"kernels must be one of {_CHOICES}, got {choice!r}")
    if choice == "auto":
        choice = os.environ.get(ENV_VAR, "auto").lower() or "auto"
        if choice not in _CHOICES:
            raise ValueError(f"{ENV_VAR} must be one of {_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "pallas" if has_hopper_gpu() else "xla"
    return choice


def attention_kernel_fits(config: GptOssConfig, dtype: jnp.dtype) -> bool:
    """Whether the Pallas attention kernels take these shapes here (gpt-oss's own always fit).

    They are written for bfloat16, head_dim 64 and groups of 8 query heads per KV head (one
    64-row WGMMA tile holds 8 heads of 8 tokens), and are not used with a CUDA whose ptxas
    miscompiles them (:mod:`pallas_kernels.cuda_toolchain`).
    """
    return (
        jnp.dtype(dtype) == jnp.bfloat16 and config.head_dim == 64 and config.q_per_kv % 8 == 0
        and not cuda_miscompiles_attention_masks()
    )


def moe_kernel_fits(config: GptOssConfig, dtype: jnp.dtype) -> bool:
    """Whether the Pallas MXFP4 expert kernel takes these sizes (gpt-oss's 2880 does).

    It reads weights in 64-row tiles and K in ``block_kb``-byte steps, for both expert
    matmuls (K = hidden size, then K = expert size).
    """
    step = 2 * mxfp4_moe.Config().block_kb  # K values per pipeline step
    return (
        jnp.dtype(dtype) == jnp.bfloat16
        and all(size % step == 0 and size % mxfp4_moe.BLOCK_N == 0
                for size in (config.hidden_size, config.intermediate_size))
    )


def interpret_params(kernels: str) -> plgpu.InterpretGPUParams | None:
    """The kernels' ``interpret`` argument for a resolved kernel choice."""
    return plgpu.InterpretGPUParams() if kernels == "interpret" else None
