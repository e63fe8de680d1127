"""What this machine offers gpt-oss: versions, devices and their memory, CUDA, and what runs each
part of the model here and why (``gptoss-jax env``, for a first look and for bug reports).

Nothing is compiled and no weights are read. The kernel lines come from the decision the model
takes (:func:`gptoss_jax.kernel_dispatch.kernel_decisions`, checked by
:func:`gptoss_jax.opening.checked_kernels`), and a checkpoint's sizes from its ``config.json``
(:mod:`gptoss_jax.footprint`), so what this reports is what opening that checkpoint would do.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_jax import footprint
from gptoss_jax.checkpoints.folder import CONFIG_FILENAME, checked_checkpoint_folder
from gptoss_jax.config import PRESETS, GptOssConfig, preset
from gptoss_jax.kernel_check import CheckMode, KernelCheckFailedError, combination, verdict_file
from gptoss_jax.kernel_dispatch import kernel_decisions, kernel_gpu_missing
from gptoss_jax.opening import (
    ModelOptionError,
    ModelTooLargeError,
    OptionName,
    check_parameters_fit,
    checked_kernels,
    checked_mesh,
    keyword_argument,
)
from pallas_kernels.cuda_toolchain import cuda_versions_found, mosaic_ptxas, ptxas_version

PACKAGES = ("gptoss-jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy")
CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt")
VARIABLE_PREFIXES = ("GPTOSS_JAX_", "JAX_", "XLA_", "CUDA_VISIBLE_DEVICES")
# The kernels as a user knows them -> the part of the KernelPlan each runs.
KERNELS = {"MoE experts": "experts", "prefill attention": "prefill_attention", "decode attention": "decode_attention"}
KERNEL_DTYPE = "bfloat16"  # the default compute dtype, the kernels' only one


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed version of each distribution of ``names`` that is installed."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _device(device: jax.Device) -> dict[str, Any]:
    return {
        "id": device.id, "platform": device.platform, "kind": device.device_kind,
        "compute_capability": getattr(device, "compute_capability", None),
        "memory_bytes": footprint.device_memory_bytes(device),
        "free_bytes": footprint.device_free_bytes(device),
        "memory_stats": device.memory_stats() if hasattr(device, "memory_stats") else None,
    }


def _kernels(config: GptOssConfig, option_name: OptionName, check: CheckMode) -> dict[str, Any]:
    """What runs each kernel's part under ``auto``, or why opening would refuse (``GPTOSS_JAX_KERNELS=pallas``).

    ``check`` as :func:`~gptoss_jax.kernel_dispatch.kernel_decisions` takes it; each part's
    ``check`` is its kernel's first-use verdict on this GPU, where there is one.
    """
    try:
        checked_kernels("auto", config, KERNEL_DTYPE, option_name, check)
    except (ModelOptionError, KernelCheckFailedError) as e:
        return {"refused": str(e), "parts": {}}
    decisions = kernel_decisions("auto", config, jnp.dtype(KERNEL_DTYPE), check="lookup")  # what was just decided
    parts = {kernel: {"runs": decisions[part].runs, "why": decisions[part].why,
                      "check": None if decisions[part].check is None else dataclasses.asdict(decisions[part].check)}
             for kernel, part in KERNELS.items()}
    return {"refused": None, "parts": parts}


def _kernel_check() -> dict[str, Any] | None:
    """What the verdicts hold for and where they are kept: on a GPU that runs kernels, where the check runs."""
    if kernel_gpu_missing() is not None:
        return None
    facts = combination()
    return {"combination": facts, "verdict_file": str(verdict_file(facts))}


def _checkpoint(checkpoint: str | os.PathLike, mesh: str | None,
                option_name: OptionName) -> tuple[GptOssConfig, dict[str, Any]]:
    """A checkpoint's model and its memory on this machine's devices, from ``config.json`` alone."""
    folder = checked_checkpoint_folder(checkpoint)
    config = GptOssConfig.from_json_file(folder / CONFIG_FILENAME)
    device_mesh = checked_mesh(mesh, config)
    devices = [jax.devices()[0]] if device_mesh is None else list(device_mesh.local_devices)
    parameters = footprint.per_device_parameter_bytes(config, None if device_mesh is None else device_mesh.shape)
    known_free = [free for free in map(footprint.device_free_bytes, devices) if free is not None]
    try:
        check_parameters_fit(config, device_mesh, option_name)
        refused = None
    except ModelTooLargeError as e:
        refused = str(e)
    room = footprint.MEMORY_FRACTION * min(map(footprint.device_memory_bytes, devices)) - parameters
    return config, {
        "folder": str(folder),
        "model": next((name for name, known in PRESETS.items() if known == config), None),
        "layers": config.num_hidden_layers, "experts": config.num_experts,
        "mesh": None if device_mesh is None else dict(device_mesh.shape),
        "parameter_bytes_per_device": parameters,
        "free_bytes": min(known_free) if known_free else None,
        "refused": refused,
        "largest_context_at_batch_1": footprint.largest_context(config, room, jnp.bfloat16, device_mesh),
        "max_context": config.max_position_embeddings,
    }


def gather_environment(checkpoint: str | os.PathLike | None = None, mesh: str | None = None,
                       option_name: OptionName = keyword_argument, check_kernels: bool = False) -> dict[str, Any]:
    """This machine's facts as a JSON-ready dict (:func:`describe_environment` prints it).

    Keys: ``python``, ``executable``, ``platform``, ``packages`` and ``cuda_plugins`` (versions), ``backend``,
    ``process_count``, ``devices`` (id, platform, kind, compute capability, memory and free bytes,
    the allocator's ``memory_stats``), ``cuda`` (runtime and driver, None without a CUDA plugin),
    ``ptxas`` (path and version, None if none is found), ``cuda_path`` (JAX's CUDA folder:
    ``$CUDA_ROOT`` or pip's CUDA, None without either), ``variables`` (``GPTOSS_JAX_*``, ``JAX_*``,
    ``XLA_*``), ``kernels`` (under ``auto`` in bfloat16: each kernel's ``runs`` and ``why``, or
    ``refused`` with opening's message; each kernel's first-use verdict on this GPU as ``check``),
    ``kernel_check`` (on a GPU that runs kernels: the combination the verdicts hold for and their file),
    ``compilation_cache`` (JAX's folder, None if off),
    ``checkpoint`` (given one: its model, parameter bytes per device against the devices' free
    bytes, the largest context a batch-1 engine takes) and ``jax_environment_info``
    (``jax.print_environment_info``, with ``nvidia-smi`` where there is one).

    Args:
      checkpoint: a checkpoint folder; only its ``config.json`` is read.
      mesh: a mesh spec for the checkpoint's per-device figures (None: the default mesh).
      option_name: how messages name options (:data:`gptoss_jax.opening.OptionName`).
      check_kernels: run each kernel's first-use check (:mod:`gptoss_jax.kernel_check`) again,
        rather than report the verdicts cached.
    """
    config, model = preset("gpt-oss-20b"), None  # 120b has the same kernel shapes
    if checkpoint is not None:
        config, model = _checkpoint(checkpoint, mesh, option_name)
    from jax._src.lib import cuda_path as jax_cuda_path  # $CUDA_ROOT, else the pip CUDA's folder, else None

    found_ptxas = mosaic_ptxas()
    version = ptxas_version()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": _versions(PACKAGES),
        "cuda_plugins": _versions(CUDA_PLUGINS),
        "backend": jax.default_backend(),
        "process_count": jax.process_count(),
        "devices": [_device(device) for device in jax.local_devices()],
        "device_count": jax.device_count(),
        "cuda": cuda_versions_found(),
        "ptxas": None if found_ptxas is None else {
            "path": found_ptxas, "version": None if version is None else ".".join(map(str, version))},
        "cuda_path": jax_cuda_path,
        "variables": {name: value for name, value in sorted(os.environ.items()) if name.startswith(VARIABLE_PREFIXES)},
        "kernels": _kernels(config, option_name, "again" if check_kernels else "lookup"),
        "kernel_check": _kernel_check(),
        "compilation_cache": jax.config.jax_compilation_cache_dir,
        "checkpoint": model,
        "jax_environment_info": jax.print_environment_info(return_string=True),
        "executable": sys.executable,
    }


def _gigabytes(size: float | None) -> str:
    return "unknown" if size is None else f"{size / 1e9:.2f} GB"


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}" if number == 1 else f"{number} {thing}{'es' if thing.endswith('s') else 's'}"


def describe_environment(report: dict[str, Any]) -> str:
    """:func:`gather_environment`'s report as one screen of text (without ``jax_environment_info``)."""
    versions = {**report["packages"], **report["cuda_plugins"]}
    packages = ", ".join(f"{name} {version}" for name, version in versions.items())
    lines = [f"Python {report['python']} ({report['executable']}) on {report['platform']}", packages,
             f"backend {report['backend']}: {_count(report['device_count'], 'device')} in "
             f"{_count(report['process_count'], 'process')}"]
    for device in report["devices"]:
        capability = f" (compute capability {device['compute_capability']})" if device["compute_capability"] else ""
        source = "" if device["memory_stats"] else " (its share of the RAM)"
        lines.append(f"  {device['platform']} {device['id']}: {device['kind']}{capability}, "
                     f"{_gigabytes(device['memory_bytes'])}{source}, {_gigabytes(device['free_bytes'])} free")
    cuda = report["cuda"]
    lines.append("CUDA: no CUDA plugin (the CPU build of jax)" if cuda is None else
                 f"CUDA: runtime {cuda['runtime'] or 'unknown'}, driver {cuda['driver'] or 'unknown'}")
    ptxas = report["ptxas"]
    if ptxas is not None:
        lines.append(f"ptxas: {ptxas['path']}, version {ptxas['version'] or 'unknown'}")
    else:
        pip_bin = None if report["cuda_path"] is None else Path(report["cuda_path"]) / "bin"
        hint = f"; pip's is in {pip_bin}: put that first on PATH" if pip_bin and (pip_bin / "ptxas").exists() else ""
        lines.append(f"ptxas: none on PATH or in /usr/local/cuda/bin{hint}")
    if report["variables"]:
        lines.append("variables: " + " ".join(f"{name}={value}" for name, value in report["variables"].items()))
    kernels = report["kernels"]
    lines.append(f"kernels (auto, {KERNEL_DTYPE}, {'this checkpoint' if report['checkpoint'] else 'gpt-oss'}):")
    if kernels["refused"]:
        lines.append(f"  refused: {kernels['refused']}")
    width = max(map(len, KERNELS))
    for kernel, decision in kernels["parts"].items():
        lines.append(f"  {kernel:{width}}  {decision['runs']:6}  {decision['why']}")
    if report["kernel_check"] is not None:
        facts = ", ".join(f"{name} {value or 'unknown'}" for name, value in report["kernel_check"]["combination"].items())
        lines.append(f"first-use kernel checks ({facts}): {report['kernel_check']['verdict_file']}")
    lines.append(f"compilation cache: {report['compilation_cache'] or 'off'}")
    model = report["checkpoint"]
    if model is not None:
        mesh = ", ".join(f"{axis}={size}" for axis, size in model["mesh"].items()) if model["mesh"] else "one device"
        verdict = "free memory unknown" if model["free_bytes"] is None else "fits"
        context = model["largest_context_at_batch_1"]
        if context == model["max_context"]:
            context_text = f"{context} positions, the model's limit"
        else:
            context_text = f"{context} positions" if context else "none"
        lines += [
            f"checkpoint {model['folder']}: {model['model'] or 'a gpt-oss model'}, {model['layers']} layers, "
            f"{model['experts']} experts",
            f"  parameters {_gigabytes(model['parameter_bytes_per_device'])} per device ({mesh}), "
            f"{_gigabytes(model['free_bytes'])} free: {'does NOT fit' if model['refused'] else verdict}",
            *([f"  refused: {model['refused']}"] if model["refused"] else []),
            f"  largest context at batch 1: {context_text} (a bfloat16 KV cache within "
            f"{footprint.MEMORY_FRACTION:.0%} of a device's memory beside the parameters)",
        ]
    return "\n".join(lines)
