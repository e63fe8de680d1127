"""Choice between the Pallas Mosaic-GPU kernels and their plain-XLA references.

``auto`` takes the kernels on Hopper-or-newer NVIDIA GPUs and the references elsewhere. The
environment variable ``GPTOSS_JAX_KERNELS`` (``pallas`` or ``xla``) overrides ``auto``; an
explicit ``kernels=`` argument overrides both.
"""

from __future__ import annotations

import os
from typing import Literal

import jax

KernelChoice = Literal["auto", "pallas", "xla"]
ENV_VAR = "GPTOSS_JAX_KERNELS"
_CHOICES = ("auto", "pallas", "xla")
_MIN_COMPUTE_CAPABILITY = 9.0  # WGMMA and TMA


def _has_hopper_gpu() -> bool:
    device = jax.devices()[0]
    if device.platform != "gpu":
        return False
    try:
        return float(device.compute_capability) >= _MIN_COMPUTE_CAPABILITY
    except (AttributeError, ValueError):
        return False


def resolve_kernels(choice: KernelChoice = "auto") -> Literal["pallas", "xla"]:
    """Turn ``auto`` into ``pallas`` or ``xla``; reject unknown names."""
    if choice not in _CHOICES:
        raise ValueError(f"kernels must be one of {_CHOICES}, got {choice!r}")
    if choice == "auto":
        choice = os.environ.get(ENV_VAR, "auto").lower() or "auto"
        if choice not in _CHOICES:
            raise ValueError(f"{ENV_VAR} must be one of {_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "pallas" if _has_hopper_gpu() else "xla"
    return choice
