"""Opening a model for a program to run: the policy the CLI follows, and a server can.

:func:`open_model` takes a checkpoint folder (or none, for the embedded demo model), a compute
dtype, a kernel choice, a mesh and whether to keep decoded experts, and gives the model, its
tokenizer and what runs where (:class:`OpenedModel`). What can be checked without the weights
is checked before any is read, and before the demo checkpoint is written: the folder and its
tokenizer, the mesh and the kernels against the model's sizes and the devices, whether decoded
experts would be read, whether the parameters fit the devices' free memory. Its messages name
the options as the caller's user knows them (``option_name``): as keyword arguments by default,
as flags for the CLI.

Importing this module is cheap (JAX loads when a model is opened), so the CLI can use it for
``--help``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptoss_jax.errors import GptOssError

if TYPE_CHECKING:
    import jax

    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.kernel_check import CheckMode
    from gptoss_jax.kernel_dispatch import KernelChoice, KernelPlan
    from gptoss_jax.model import GptOss
    from gptoss_jax.tokenizer import Tokenizer

DTYPES = ("bfloat16", "float32")
GPU_MEMORY_FRACTION_VARIABLE = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# XLA's GPU allocator takes 75% of the card unless told otherwise: 60 GB of an 80 GB H100, less
# than gpt-oss-120b's 65 GB of parameters. A program that runs one model gives XLA most of the
# card, as vLLM does.
GPU_MEMORY_FRACTION = 0.95
# How messages name an option, given its name and, where a value matters, the value.
OptionName = Callable[..., str]


def give_xla_most_of_the_gpu() -> None:
    """Give XLA :data:`GPU_MEMORY_FRACTION` of the GPU unless the environment says otherwise.

    Call it before anything starts JAX's backend, which reads the share once.
    """
    os.environ.setdefault(GPU_MEMORY_FRACTION_VARIABLE, str(GPU_MEMORY_FRACTION))


class ModelOptionError(GptOssError):
    """An option of :func:`open_model` that cannot work with this model or on these devices."""


class KernelsUnavailableError(ModelOptionError):
    """The Pallas kernels asked for on a device that has none: not an NVIDIA Hopper GPU."""


class MiscompilingCudaError(ModelOptionError):
    """The Pallas kernels asked for where the CUDA toolchain would compile attention wrongly."""


class ModelTooLargeError(GptOssError):
    """A model whose parameters alone exceed the free memory of a device; the message gives the figures."""


def keyword_argument(name: str, value: Any = None) -> str:
    """An option as :func:`open_model`'s keyword argument: ``kernels='xla'``, or ``checkpoint``."""
    return name if value is None else f"{name}={value!r}"


def random_weights_note(option_name: OptionName = keyword_argument) -> str:
    """What :func:`open_model` reports when it opens the embedded demo model."""
    return ("note: the embedded demo model has random weights, so its text is gibberish; "
            f"pass {option_name('checkpoint')} for a real gpt-oss checkpoint")


def describe_settings(dtype: str, kernels: KernelPlan, mesh: jax.sharding.Mesh | None) -> str:
    """``bfloat16; kernels xla; mesh data=1, expert=2, tensor=2`` (no mesh part without one)."""
    settings = [dtype, kernels.describe()]
    if mesh is not None:
        settings.append("mesh " + ", ".join(f"{axis}={size}" for axis, size in mesh.shape.items()))
    return "; ".join(settings)


@dataclasses.dataclass(frozen=True)
class OpenedModel:
    """A model :func:`open_model` opened, with its tokenizer and what it runs with.

    Attributes:
      model: the model, its weights on the devices.
      tokenizer: the checkpoint's tokenizer.
      folder: the checkpoint folder read (the demo checkpoint's when none was named).
      dtype: the compute dtype's name, ``bfloat16`` or ``float32``.
      kernels: what runs attention and the experts (the Pallas kernels or the XLA reference).
      mesh: the mesh the model is sharded over, or None on one device.
      is_demo: the embedded demo model (random weights) was opened.
    """

    model: GptOss
    tokenizer: Tokenizer
    folder: Path
    dtype: str
    kernels: KernelPlan
    mesh: jax.sharding.Mesh | None
    is_demo: bool

    def describe(self) -> str:
        """The settings as the load line shows them: see :func:`describe_settings`."""
        return describe_settings(self.dtype, self.kernels, self.mesh)


def _ignore(message: str) -> None:
    """The default ``on_status``: tell nobody."""


def open_model(
    checkpoint: str | os.PathLike | None = None,
    *,
    dtype: str = "bfloat16",
    kernels: KernelChoice = "auto",
    mesh: str | jax.sharding.Mesh | None = None,
    decode_experts: bool = False,
    progress: bool = False,
    on_status: Callable[[str], None] = _ignore,
    option_name: OptionName = keyword_argument,
) -> OpenedModel:
    """Open a checkpoint, or the embedded demo model, the way the CLI does.

    Args:
      checkpoint: a folder in any layout ``gptoss_jax.load`` reads, with its ``tokenizer.json``
        (for an ``original/`` folder, in its parent). None: the embedded demo model, written
        into the cache on first use (:mod:`gptoss_jax.demo`).
      dtype: the compute dtype, ``bfloat16`` or ``float32``.
      kernels: ``auto``, ``pallas``, ``xla`` or ``interpret`` (:mod:`gptoss_jax.kernel_dispatch`);
        ``pallas`` (asked for, or by ``GPTOSS_JAX_KERNELS`` under ``auto``) needs a Hopper GPU.
      mesh: a spec such as ``expert=2,tensor=4`` or a mesh, checked against the model; None:
        the model's default mesh over every device (:func:`gptoss_jax.sharding.make_mesh`), or
        no mesh on a single device.
      decode_experts: keep a bfloat16 copy of the expert weights (``GptOss.decode_experts``);
        single device and the XLA expert path only.
      progress: draw a progress bar on stderr while loading, when stderr is a terminal.
      on_status: called with each line worth telling a user: the demo checkpoint being written,
        the demo's note, ``loading <folder> (<settings>) ...``, the note that dense expert weights
        are being quantized to MXFP4, and ``loaded in <s> s``.
      option_name: how messages name an option, ``option_name(name)`` or ``option_name(name,
        value)`` (:func:`keyword_argument` by default; the CLI passes one that gives its flags).

    Returns:
      The :class:`OpenedModel`.

    Raises:
      CheckpointError, LayoutError, ConfigError, TokenizerError, FileNotFoundError: the folder
        or its tokenizer cannot be read.
      MeshError, KernelChoiceError, ModelOptionError: the mesh, the kernels or
        ``decode_experts`` cannot work with this model here (:class:`KernelsUnavailableError`:
        ``pallas`` without a Hopper GPU; :class:`MiscompilingCudaError`: ``pallas`` with a CUDA
        that miscompiles attention; :class:`~gptoss_jax.kernel_check.KernelCheckFailedError`:
        ``pallas`` where a kernel failed its first-use check on this GPU).
      ModelTooLargeError: the parameters alone exceed a device's free memory.
    """
    import jax.numpy as jnp

    import gptoss_jax
    from gptoss_jax.checkpoints.folder import CONFIG_FILENAME, checked_checkpoint_folder
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.demo import demo_config, ensure_demo_checkpoint
    from gptoss_jax.tokenizer import Tokenizer

    if dtype not in DTYPES:
        raise ModelOptionError(f"{option_name('dtype')} must be one of {DTYPES}, got {dtype!r}")
    if checkpoint is None:
        config = demo_config()
    else:
        folder = checked_checkpoint_folder(checkpoint)
        config = GptOssConfig.from_json_file(folder / CONFIG_FILENAME)  # every layout has one
        tokenizer = Tokenizer.from_pretrained_dir(folder)
    device_mesh = checked_mesh(mesh, config)
    plan = checked_kernels(kernels, config, dtype, option_name)
    if decode_experts:
        _check_decode_experts(device_mesh, plan, option_name)
    check_parameters_fit(config, device_mesh, option_name)
    if checkpoint is None:
        folder = ensure_demo_checkpoint(
            on_create=lambda path: on_status(f"writing the embedded demo checkpoint to {path}")
        )
        on_status(random_weights_note(option_name))
        tokenizer = Tokenizer.from_pretrained_dir(folder)
    on_status(f"loading {folder} ({describe_settings(dtype, plan, device_mesh)}) ...")
    start = time.perf_counter()
    model = gptoss_jax.load(folder, dtype=getattr(jnp, dtype), kernels=kernels, mesh=device_mesh, progress=progress,
                            on_status=on_status)
    if decode_experts:
        model.decode_experts()
    on_status(f"loaded in {time.perf_counter() - start:.1f} s")
    return OpenedModel(model, tokenizer, Path(folder), dtype, plan, device_mesh, is_demo=checkpoint is None)


def checked_mesh(mesh: str | jax.sharding.Mesh | None, config: GptOssConfig) -> jax.sharding.Mesh | None:
    """The mesh asked for, or the model's default mesh (none on one device), checked against the model."""
    import jax

    from gptoss_jax.sharding import check_mesh, make_mesh

    if mesh is None and jax.device_count() == 1:
        return None
    if not isinstance(mesh, jax.sharding.Mesh):
        mesh = make_mesh(mesh, config=config)
    check_mesh(mesh, config)
    return mesh


def checked_kernels(kernels: KernelChoice, config: GptOssConfig, dtype: str,
                    option_name: OptionName = keyword_argument, check: CheckMode = "first_use") -> KernelPlan:
    """What runs attention and the experts under ``kernels``, refusing kernels asked for that cannot run here.

    ``check``: run each kernel's first-use check where none is cached (``first_use``), only look
    the verdicts up (``lookup``), or run it again (``again``): :mod:`gptoss_jax.kernel_check`.

    Raises:
      KernelsUnavailableError: ``pallas`` (asked for, or by ``GPTOSS_JAX_KERNELS``) on a device that runs
        no kernel (a Hopper GPU runs them all, Ampere, Ada and Blackwell GPUs the expert kernel).
      MiscompilingCudaError: ``pallas`` where the CUDA toolchain miscompiles the attention kernels
        (``auto`` leaves attention on XLA there instead).
      KernelCheckFailedError: ``pallas`` where a kernel failed its first-use check on this GPU
        (``auto`` runs that kernel's part on XLA instead; :mod:`gptoss_jax.kernel_check`).
    """
    from gptoss_jax.kernel_check import KernelCheckFailedError, refusal
    from gptoss_jax.kernel_dispatch import KERNEL_GPU, kernel_gpu_missing, kernel_plan, requested_kernels
    from pallas_kernels.cuda_toolchain import FIX, MISCOMPILES, miscompiling_toolchain

    requested, source = requested_kernels(kernels)
    asked = option_name("kernels", "pallas") if source is None else f"{source}=pallas"
    auto = option_name("kernels", "auto") if source is None else f"unset {source}"
    if requested == "pallas":
        missing = kernel_gpu_missing()
        if missing is not None:
            raise KernelsUnavailableError(
                f"{asked} needs {KERNEL_GPU}, but {missing}; use {option_name('kernels', 'xla')}")
        culprit = miscompiling_toolchain()
        if culprit is not None:
            raise MiscompilingCudaError(
                f"{asked}: {MISCOMPILES} ({culprit}); {FIX}, or {auto} to keep attention on XLA there"
            )
    try:
        return kernel_plan(kernels, config, dtype, check)
    except KernelCheckFailedError as e:  # named as this caller's user knows the options
        instead = f"use {auto}" if source is None else auto
        raise KernelCheckFailedError(refusal(e.verdict, asked, instead), e.verdict) from None


def check_parameters_fit(config: GptOssConfig, mesh: jax.sharding.Mesh | None,
                         option_name: OptionName = keyword_argument) -> None:
    """Refuse a model whose parameters alone exceed the free memory of a device it would go to.

    The parameters' bytes come from shapes (:mod:`gptoss_jax.footprint`), so this costs no weight
    read; a device whose free memory is unknown is not checked.

    Raises:
      ModelTooLargeError: with the figures and the fix.
    """
    import jax

    from gptoss_jax.footprint import device_free_bytes, per_device_parameter_bytes

    needed = per_device_parameter_bytes(config, None if mesh is None else mesh.shape)
    for device in [jax.devices()[0]] if mesh is None else mesh.local_devices:
        free = device_free_bytes(device)
        if free is not None and needed > free:
            if device.platform == "cpu":
                where, share = "the machine's RAM", ""
            else:  # XLA's allocator takes a share of the GPU when the backend starts
                fraction = os.environ.get(GPU_MEMORY_FRACTION_VARIABLE, "0.75 by default")
                where = f"{device.device_kind} (device {device.id})"
                share = (f"give JAX more of the GPU than {fraction} "
                         f"({GPU_MEMORY_FRACTION_VARIABLE}={GPU_MEMORY_FRACTION}), ")
            raise ModelTooLargeError(
                f"the model's parameters take {needed / 1e9:.2f} GB per device, but {where} has "
                f"{free / 1e9:.2f} GB free; {share}use a device with more memory, or split the model over "
                f"more devices ({option_name('mesh')})"
            )


def _check_decode_experts(mesh: jax.sharding.Mesh | None, kernels: KernelPlan, option_name: OptionName) -> None:
    """Refuse ``decode_experts`` where the model could not or would not read the copy."""
    if mesh is not None:
        raise ModelOptionError(f"{option_name('decode_experts')} works on a single device, but this run uses a "
                               f"mesh of {mesh.devices.size} devices")
    if kernels.experts != "xla":
        raise ModelOptionError(
            f"{option_name('decode_experts')} is for the XLA path, but the {kernels.experts} expert kernel "
            f"runs here and reads the packed weights; add {option_name('kernels', 'xla')}"
        )
