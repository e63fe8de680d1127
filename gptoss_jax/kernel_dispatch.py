"""Choice between the Pallas Mosaic-GPU kernels and their plain-XLA references.

``auto`` takes the kernels on Hopper-or-newer NVIDIA GPUs and the references elsewhere;
``pallas`` and ``xla`` force either; ``interpret`` runs the kernels in Mosaic GPU interpret
mode on the CPU (slow; for testing the kernel path without a GPU). The environment variable
``GPTOSS_JAX_KERNELS`` overrides ``auto``; an explicit ``kernels=`` argument overrides both.

Each kernel takes only the shapes it was written for, so a choice becomes a :class:`KernelPlan`
(:func:`kernel_plan`), which says what runs each part of the model: the one place that decides,
for the model as for what the CLI shows.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from gptoss_jax.config import GptOssConfig
from gptoss_jax.errors import GptOssError
from pallas_kernels import mxfp4_moe
from pallas_kernels.cuda_toolchain import cuda_miscompiles_attention_masks

KernelChoice = Literal["auto", "pallas", "xla", "interpret"]
Implementation = Literal["pallas", "xla", "interpret"]  # what a resolved choice runs
ENV_VAR = "GPTOSS_JAX_KERNELS"
_CHOICES = ("auto", "pallas", "xla", "interpret")
_MIN_COMPUTE_CAPABILITY = 9.0  # WGMMA and TMA


class KernelChoiceError(GptOssError):
    """A kernel choice that is no choice: an unknown name, in an argument or the environment."""


def has_hopper_gpu() -> bool:
    """Whether the default device is an NVIDIA GPU with WGMMA and TMA (sm_90 or newer)."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return False
    try:
        return float(device.compute_capability) >= _MIN_COMPUTE_CAPABILITY
    except (AttributeError, ValueError):
        return False


def resolve_kernels(choice: KernelChoice = "auto") -> Implementation:
    """Turn ``auto`` into ``pallas`` or ``xla``; reject unknown names (:class:`KernelChoiceError`)."""
    if choice not in _CHOICES:
        raise KernelChoiceError(f"kernels must be one of {_CHOICES}, got {choice!r}")
    if choice == "auto":
        choice = os.environ.get(ENV_VAR, "auto").lower() or "auto"
        if choice not in _CHOICES:
            raise KernelChoiceError(f"{ENV_VAR} must be one of {_CHOICES}, got {choice!r}")
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


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What runs each part of the model: ``pallas``, ``interpret`` (the kernels) or ``xla``."""

    attention: Implementation
    experts: Implementation

    def describe(self) -> str:
        """``kernels xla`` when one runs everything, else ``kernels: attention pallas, experts xla``."""
        parts = dataclasses.asdict(self)
        if len(set(parts.values())) == 1:
            return f"kernels {self.attention}"
        return "kernels: " + ", ".join(f"{part} {implementation}" for part, implementation in parts.items())


def kernel_plan(choice: KernelChoice, config: GptOssConfig, dtype: jnp.dtype) -> KernelPlan:
    """What runs attention and the experts of a ``config`` model computing in ``dtype`` under ``choice``.

    A kernel runs a part where the choice resolves to it and the part's shapes fit it; the XLA
    reference runs the rest, so ``pallas`` may leave a part on XLA.
    """
    kernels = resolve_kernels(choice)
    return KernelPlan(
        attention=kernels if attention_kernel_fits(config, dtype) else "xla",
        experts=kernels if moe_kernel_fits(config, dtype) else "xla",
    )


def interpret_params(kernels: str) -> plgpu.InterpretGPUParams | None:
    """The kernels' ``interpret`` argument for a resolved kernel choice."""
    return plgpu.InterpretGPUParams() if kernels == "interpret" else None
