"""Choice between the Pallas Mosaic-GPU kernels and their plain-XLA references.

``auto`` takes the kernels on NVIDIA GPUs that have them and the references elsewhere:
on Hopper (sm_90) all of them (WGMMA); on Ampere, Ada and Blackwell (sm_80, sm_86, sm_89,
sm_100, sm_120) the ``mma.sync`` expert kernel (:mod:`pallas_kernels.mxfp4_moe_mma`), with
attention on XLA (docs/kernels.md says why). ``pallas`` and ``xla`` force either; ``interpret``
runs the kernels in Mosaic GPU interpret mode on the CPU (slow; for testing the kernel path
without a GPU). The environment variable ``GPTOSS_JAX_KERNELS`` overrides ``auto``; an explicit
``kernels=`` argument overrides both.

Each kernel takes only the shapes it was written for, so a choice becomes a :class:`KernelPlan`
(:func:`kernel_plan`), which says what runs each part of the model: the one place that decides,
for the model as for what the CLI shows. :func:`kernel_decisions` gives each part's reason too
(the device, the shapes, the CUDA toolchain, the kernel's first-use check on this GPU:
:mod:`gptoss_jax.kernel_check`), which ``gptoss-jax env`` prints, and :func:`expert_matmul` the
expert matmul a plan's choice runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from gptoss_jax.config import GptOssConfig
from gptoss_jax.errors import GptOssError
from gptoss_jax.kernel_check import (
    KERNEL_CHECKS,
    MMA_SYNC_KERNEL_CHECKS,
    CheckMode,
    KernelCheckFailedError,
    Verdict,
    checks_enabled,
    kernel_verdict,
    refusal,
    warn_fallback,
)
from pallas_kernels import mxfp4_moe
from pallas_kernels.cuda_toolchain import FIX, MISCOMPILES, miscompiling_toolchain

KernelChoice = Literal["auto", "pallas", "xla", "interpret"]
Implementation = Literal["pallas", "xla", "interpret"]  # what a resolved choice runs
ENV_VAR = "GPTOSS_JAX_KERNELS"
_CHOICES = ("auto", "pallas", "xla", "interpret")
# WGMMA, which the attention kernels and the Hopper expert kernel use, exists on Hopper only:
# sm_90a code does not run on later GPUs (Blackwell has tcgen05 instead).
_HOPPER_MAJOR = 9
HOPPER_GPU = "an NVIDIA Hopper GPU (sm_90)"
# The GPUs the mma.sync expert kernel is for (A100; A10G, RTX 30xx; L4, L40S, RTX 40xx; B200;
# RTX 50xx): mma.sync runs on all of them; benchmarks.kernels.kernel_sass compiles it for sm_80, sm_89
# and sm_120, and sm_86 and sm_100 take the same instructions.
MMA_SYNC_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (10, 0), (12, 0))
KERNEL_GPU = "an NVIDIA GPU of sm_80, sm_86, sm_89, sm_90, sm_100 or sm_120"


class KernelChoiceError(GptOssError):
    """A kernel choice that is no choice: an unknown name, in an argument or the environment."""


def compute_capability() -> tuple[int, int] | None:
    """The default device's NVIDIA compute capability, ``(8, 9)``; None elsewhere (the CPU, other GPUs)."""
    device = jax.devices()[0]
    major, _, minor = str(getattr(device, "compute_capability", "")).partition(".")
    if device.platform != "gpu" or not (major.isdigit() and minor.isdigit()):
        return None
    return int(major), int(minor)


def _device_description() -> str:
    """``the device is cpu``, ``the device is NVIDIA L4 (sm_89)``."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return f"the device is {device.platform}"
    capability = compute_capability()
    if capability is None:  # not an NVIDIA compute capability
        return f"the device is {device.device_kind} (compute capability {getattr(device, 'compute_capability', 'unknown')})"
    return f"the device is {device.device_kind} (sm_{capability[0]}{capability[1]})"


def hopper_gpu_missing() -> str | None:
    """Why the default device cannot run the Hopper kernels (``the device is cpu``); None on a Hopper GPU."""
    capability = compute_capability()
    if capability is not None and capability[0] == _HOPPER_MAJOR:
        return None
    later = capability is not None and capability[0] > _HOPPER_MAJOR
    return _device_description() + (": WGMMA, which the Hopper kernels use, is Hopper's alone" if later else "")


def has_hopper_gpu() -> bool:
    """Whether the default device is an NVIDIA Hopper GPU (sm_90: WGMMA and TMA)."""
    return hopper_gpu_missing() is None


def has_mma_sync_gpu() -> bool:
    """Whether the default device is one the ``mma.sync`` expert kernel is for (:data:`MMA_SYNC_CAPABILITIES`)."""
    return compute_capability() in MMA_SYNC_CAPABILITIES


def kernel_gpu_missing() -> str | None:
    """Why the default device runs none of the kernels (``the device is cpu``); None on a GPU that
    runs some: Hopper all, :data:`MMA_SYNC_CAPABILITIES` the expert kernel."""
    return None if has_hopper_gpu() or has_mma_sync_gpu() else _device_description()


def requested_kernels(choice: KernelChoice = "auto") -> tuple[KernelChoice, str | None]:
    """The choice in force and who made it: ``choice`` (None), else ``GPTOSS_JAX_KERNELS`` (its name) for ``auto``.

    ``("auto", None)`` when neither asks for anything; unknown names raise :class:`KernelChoiceError`.
    """
    if choice not in _CHOICES:
        raise KernelChoiceError(f"kernels must be one of {_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice, None
    from_environment = os.environ.get(ENV_VAR, "auto").lower() or "auto"
    if from_environment not in _CHOICES:
        raise KernelChoiceError(f"{ENV_VAR} must be one of {_CHOICES}, got {from_environment!r}")
    return from_environment, ENV_VAR if from_environment != "auto" else None


def _resolved(choice: KernelChoice) -> tuple[Implementation, str]:
    """What ``choice`` runs where shapes allow, and why: ``("xla", "auto: ...; the device is cpu")``."""
    requested, source = requested_kernels(choice)
    if requested != "auto":
        return requested, f"kernels={requested!r} asked for" if source is None else f"{source}={requested}"
    missing = kernel_gpu_missing()
    if missing is None:
        return "pallas", f"auto: {_device_description()}"
    return "xla", f"auto: the kernels need {KERNEL_GPU}; {missing}"


def resolve_kernels(choice: KernelChoice = "auto") -> Implementation:
    """Turn ``auto`` into ``pallas`` or ``xla``; reject unknown names (:class:`KernelChoiceError`)."""
    return _resolved(choice)[0]


def attention_kernel_misfit(config: GptOssConfig, dtype: jnp.dtype) -> str | None:
    """Why the Pallas attention kernels do not take these shapes here; None if they do (gpt-oss's do).

    They are written for bfloat16, head_dim 64 and groups of 8 query heads per KV head (one
    64-row WGMMA tile holds 8 heads of 8 tokens), and are not used with a CUDA whose ptxas
    miscompiles them (:mod:`pallas_kernels.cuda_toolchain`).
    """
    if jnp.dtype(dtype) != jnp.bfloat16:
        return f"the attention kernels compute in bfloat16, not {jnp.dtype(dtype).name}"
    if config.head_dim != 64:
        return f"the attention kernels take head_dim 64, not {config.head_dim}"
    if config.q_per_kv % 8:
        return f"the attention kernels take multiples of 8 query heads per KV head, not {config.q_per_kv}"
    culprit = miscompiling_toolchain()
    if culprit is not None:
        return f"{MISCOMPILES} ({culprit}); {FIX}"
    return None


def attention_kernel_fits(config: GptOssConfig, dtype: jnp.dtype) -> bool:
    """Whether the Pallas attention kernels take these shapes here: :func:`attention_kernel_misfit`."""
    return attention_kernel_misfit(config, dtype) is None


def moe_kernel_misfit(config: GptOssConfig, dtype: jnp.dtype) -> str | None:
    """Why the Pallas MXFP4 expert kernel does not take these sizes; None if it does (gpt-oss's 2880 does).

    It reads weights in 64-row tiles and K in ``block_kb``-byte steps, for both expert
    matmuls (K = hidden size, then K = expert size).
    """
    if jnp.dtype(dtype) != jnp.bfloat16:
        return f"the expert kernel computes in bfloat16, not {jnp.dtype(dtype).name}"
    multiple = math.lcm(2 * mxfp4_moe.Config().block_kb, mxfp4_moe.BLOCK_N)  # K values per pipeline step, N tile
    sizes = (config.hidden_size, config.intermediate_size)
    if any(size % multiple for size in sizes):
        return (f"the expert kernel takes hidden and expert sizes in multiples of {multiple}, "
                f"not {sizes[0]} and {sizes[1]}")
    return None


def moe_kernel_fits(config: GptOssConfig, dtype: jnp.dtype) -> bool:
    """Whether the Pallas MXFP4 expert kernel takes these sizes: :func:`moe_kernel_misfit`."""
    return moe_kernel_misfit(config, dtype) is None


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What runs each part of the model: ``pallas``, ``interpret`` (the kernels) or ``xla``.

    ``prefill_attention`` is a prompt's first chunk, attending within itself; ``decode_attention``
    every later chunk and decode step, attending over the cache.
    """

    prefill_attention: Implementation
    decode_attention: Implementation
    experts: Implementation

    def describe(self) -> str:
        """``kernels xla`` when one runs everything, else ``kernels: prefill attention pallas, ..., experts xla``."""
        parts = dataclasses.asdict(self)
        if len(set(parts.values())) == 1:
            return f"kernels {self.experts}"
        return "kernels: " + ", ".join(f"{part.replace('_', ' ')} {runs}" for part, runs in parts.items())


@dataclasses.dataclass(frozen=True)
class PartDecision:
    """What runs one part of the model, and why (``auto: the device is NVIDIA H100 80GB HBM3``).

    ``check``: the kernel's first-use verdict on this GPU, where one was run or looked up.
    """

    runs: Implementation
    why: str
    check: Verdict | None = None


def kernel_decisions(choice: KernelChoice, config: GptOssConfig, dtype: jnp.dtype,
                     check: CheckMode = "first_use") -> dict[str, PartDecision]:
    """What runs each part of a ``config`` model computing in ``dtype`` under ``choice``, and why.

    The parts are :class:`KernelPlan`'s fields. A kernel runs a part where the choice resolves
    to it and the part's shapes fit it; the XLA reference runs the rest, so ``pallas`` may leave
    a part on XLA. On a GPU that runs kernels, a kernel also has to pass its first-use check
    (:mod:`gptoss_jax.kernel_check`: Hopper's kernels there, the ``mma.sync`` expert kernel on
    :data:`MMA_SYNC_CAPABILITIES`; ``check`` says whether to run it or only look its verdict
    up): one that fails runs on XLA under ``auto``, with a warning, and is refused when asked for.

    Raises:
      KernelCheckFailedError: a kernel asked for (``pallas``, or ``GPTOSS_JAX_KERNELS=pallas``)
        failed its check.
    """
    kernels, why = _resolved(choice)
    misfits = {"prefill_attention": attention_kernel_misfit, "decode_attention": attention_kernel_misfit,
               "experts": moe_kernel_misfit}
    missing = kernel_gpu_missing() if requested_kernels(choice)[0] == "auto" else None
    decisions = {}
    for part, misfit in misfits.items():
        if missing is not None:
            # Auto on a device no kernel runs on: each part says which GPU its own kernel needs.
            needed = f"the expert kernels need {KERNEL_GPU}" if part == "experts" else (
                f"the attention kernels need {HOPPER_GPU}")
            decisions[part] = PartDecision("xla", f"auto: {needed}; {missing}")
            continue
        reason = misfit(config, dtype) if kernels != "xla" else None
        if reason is None and part != "experts" and kernels == "pallas" and has_mma_sync_gpu():
            reason = (f"the attention kernels need {HOPPER_GPU}; {_device_description()}, where attention "
                      "stays on XLA (docs/kernels.md)")
        decisions[part] = PartDecision("xla", reason) if reason else PartDecision(kernels, why)
    if kernels == "pallas" and kernel_gpu_missing() is None:
        decisions.update(_checked(decisions, config, check, requested_kernels(choice)))
    return decisions


def _checked(decisions: dict[str, PartDecision], config: GptOssConfig, mode: CheckMode,
             requested: tuple[KernelChoice, str | None]) -> dict[str, PartDecision]:
    """The decisions of the parts a kernel runs, after each kernel's first-use check."""
    checked = {}
    for kernel_check in KERNEL_CHECKS if has_hopper_gpu() else MMA_SYNC_KERNEL_CHECKS:
        decision = decisions[kernel_check.part]
        if decision.runs != "pallas":
            continue
        verdict = kernel_verdict(kernel_check, config, mode)
        if verdict is None:
            unchecked = "not checked here yet (gptoss-jax env --check-kernels)" if checks_enabled() else (
                "unchecked (GPTOSS_JAX_KERNEL_CHECK=0)")
            checked[kernel_check.part] = PartDecision("pallas", f"{decision.why}; {unchecked}")
        elif verdict.passed:
            checked[kernel_check.part] = PartDecision("pallas", f"{decision.why}; {verdict.describe()}", verdict)
        elif requested[0] == "auto":
            warn_fallback(verdict)
            checked[kernel_check.part] = PartDecision("xla", verdict.describe(), verdict)
        else:
            asked = "kernels='pallas'" if requested[1] is None else f"{requested[1]}=pallas"
            instead = "use kernels='auto'" if requested[1] is None else f"unset {requested[1]}"
            raise KernelCheckFailedError(refusal(verdict, asked, instead), verdict)
    return checked


def kernel_plan(choice: KernelChoice, config: GptOssConfig, dtype: jnp.dtype,
                check: CheckMode = "first_use") -> KernelPlan:
    """What runs each part: :func:`kernel_decisions` without the reasons."""
    decisions = kernel_decisions(choice, config, dtype, check)
    return KernelPlan(**{part: decision.runs for part, decision in decisions.items()})


def interpret_params(kernels: str) -> plgpu.InterpretGPUParams | None:
    """The kernels' ``interpret`` argument for a resolved kernel choice."""
    return plgpu.InterpretGPUParams() if kernels == "interpret" else None


def expert_matmul(kernels: Implementation) -> Callable:
    """The expert matmul a resolved choice runs: the XLA reference for ``xla``; for ``pallas`` the
    ``mma.sync`` kernel on :data:`MMA_SYNC_CAPABILITIES` GPUs and the WGMMA kernel elsewhere (on
    Hopper, and where programs are lowered for a GPU without one, which Mosaic GPU does for
    sm_90); for ``interpret`` the WGMMA kernel in interpret mode."""
    if kernels == "xla":
        from pallas_kernels.mxfp4_moe_reference import mxfp4_grouped_matmul_reference

        return mxfp4_grouped_matmul_reference
    if kernels == "pallas" and has_mma_sync_gpu():
        from pallas_kernels.mxfp4_moe_mma import mxfp4_grouped_matmul_mma

        return mxfp4_grouped_matmul_mma
    return functools.partial(mxfp4_moe.mxfp4_grouped_matmul, interpret=interpret_params(kernels))
