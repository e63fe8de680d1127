"""Device meshes and the partition rules of gpt-oss: expert, tensor and data parallelism.

A mesh has three axes, outermost first: ``data`` (batch rows), ``expert`` and ``tensor``.
Parameters name *logical* axes in their ``out_sharding`` metadata; :data:`LOGICAL_AXIS_RULES`
maps them onto the mesh:

=========  ======================  ===================================================
logical    mesh axes               split
=========  ======================  ===================================================
experts    (expert, tensor)        MXFP4 blocks and scales, mlp1/mlp2 biases, by expert
heads      tensor                  fused QKV rows (whole KV groups), sinks, out columns,
                                   and the KV cache's KV heads
vocab      (expert, tensor)        embedding and unembedding rows
batch      data                    activations and the KV cache's rows
=========  ======================  ===================================================

Everything else (norms, the router, the out-projection bias) is replicated; no parameter is
split over ``data``. Experts span both model axes, not ``expert`` alone: an expert's own
dimensions do not split well (its 2880 inputs are 90 MXFP4 blocks, which 4 or 8 devices do not
divide), and splitting whole experts over every model device leaves no replicated expert bytes.

The default mesh (:func:`default_mesh_shape`) follows the model: as many devices on ``tensor``
as divide its KV heads (8 for gpt-oss), then as many on ``expert`` as the experts and the
vocabulary still divide over, and whatever is left on ``data``. Decode reads every weight and
the whole KV cache per token, so the best mesh for it is the one that replicates nothing:
``tensor`` splits the attention weights and the KV cache, and with it the experts and the
vocabulary; ``expert`` alone would copy attention and the cache to every device. ``data`` > 1
copies the whole model per replica and suits only small models or throughput over many
independent batches, which is why the default uses it only for devices the model cannot split
over.

Example::

    mesh = make_mesh("expert=2,tensor=4")         # 8 devices
    model = gptoss_jax.load("gpt-oss-120b/", mesh=mesh)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_jax.config import GptOssConfig, preset
from gptoss_jax.errors import GptOssError

AXES = ("data", "expert", "tensor")
"""The mesh's axis names, outermost first."""

BATCH = "batch"
EXPERTS = "experts"
HEADS = "heads"
VOCAB = "vocab"
EXPERT_SHARDS = ("expert", "tensor")
"""The mesh axes the experts (and the vocabulary) are split over, expert-major."""

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    (BATCH, "data"),
    (EXPERTS, EXPERT_SHARDS),
    (HEADS, "tensor"),
    (VOCAB, EXPERT_SHARDS),
)

LogicalAxes = tuple[str | None, ...]

class MeshError(GptOssError):
    """A mesh that does not fit the devices or the model; the message says which size is wrong."""


class MeshDeviceCountError(MeshError):
    """A mesh whose sizes multiply to more (or fewer) devices than there are."""


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"data=1,expert=4,tensor=2"`` (or a mapping) -> axis sizes; missing axes are 1."""
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, equals, value = item.partition("=")
            name = name.strip()
            if not equals or not value.strip().isdigit():
                raise MeshError(f"mesh spec {spec!r}: expected items like 'expert=4', got {item!r}")
            if name in sizes:
                raise MeshError(f"mesh spec {spec!r}: axis {name!r} given twice")
            sizes[name] = int(value)
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; the axes are {', '.join(AXES)}")
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise MeshError(f"mesh axis {name!r} must be a positive integer, got {size!r}")
    return {axis: int(sizes.get(axis, 1)) for axis in AXES}


def default_mesh_shape(device_count: int, config: GptOssConfig | None = None) -> dict[str, int]:
    """The mesh that splits ``config``'s model over the most of ``device_count`` devices.

    Among the sizes that fit the model (:func:`mesh_misfits`: ``tensor`` divides the KV heads,
    ``expert`` x ``tensor`` divides the experts and the vocabulary), it takes the largest
    ``expert`` x ``tensor``, and of those the largest ``tensor``; the devices left over go to
    ``data``, whole copies of the model. For gpt-oss on 1, 2, 4, 8, 16 or 32 devices that is ``tensor`` up to 8
    and the rest on ``expert``; on 3 devices it is ``data=3``.

    Args:
      device_count: the devices the mesh spans.
      config: the model; None: gpt-oss-20b, whose sizes gpt-oss-120b's divide too, so the mesh
        fits both.
    """
    config = preset("gpt-oss-20b") if config is None else config
    candidates = (
        {"data": device_count // (expert * tensor), "expert": expert, "tensor": tensor}
        for tensor in _divisors(device_count)
        for expert in _divisors(device_count // tensor)
    )
    return max(
        (sizes for sizes in candidates if not mesh_misfits(sizes, config)),
        key=lambda sizes: (sizes["expert"] * sizes["tensor"], sizes["tensor"]),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(
    spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None,
    config: GptOssConfig | None = None,
) -> Mesh:
    """A ``("data", "expert", "tensor")`` mesh over ``devices`` (default: all, of every process).

    Args:
      spec: axis sizes, as the CLI's ``--mesh`` string (``"expert=4,tensor=2"``) or a mapping;
        missing axes are 1. None: :func:`default_mesh_shape` for ``config``.
      devices: the devices to use; their number must be the product of the sizes.
      config: the model the default mesh is for (None: one that fits gpt-oss-20b and 120b).
        It does not check ``spec``; :func:`check_mesh` does.

    Raises:
      MeshError: a malformed spec; :class:`MeshDeviceCountError`: sizes whose product is not the
        device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = default_mesh_shape(len(devices), config) if spec is None else parse_mesh_spec(spec)
    shape = tuple(sizes[axis] for axis in AXES)
    if math.prod(shape) != len(devices):
        raise MeshDeviceCountError(
            f"mesh {', '.join(f'{a}={s}' for a, s in sizes.items())} needs {math.prod(shape)} devices, "
            f"but there are {len(devices)}; give sizes whose product is {len(devices)}, or leave the mesh out "
            "(the default spans every device)"
        )
    # Auto axes: XLA propagates the parameters' shardings through the model outside the
    # shard_map regions, as in any jit; explicit axes would make every op state its sharding.
    axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
    if len(devices) == len(jax.devices()):
        # Lets JAX order the devices by their interconnect (tensor, the innermost axis, closest).
        return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=axis_types)


def check_mesh(mesh: Mesh, config: GptOssConfig) -> None:
    """Raise :class:`MeshError` unless the mesh's axes divide what they split."""
    if tuple(mesh.axis_names) != AXES:
        raise MeshError(f"the mesh's axes must be {AXES} (use make_mesh), got {tuple(mesh.axis_names)}")
    misfits = mesh_misfits(mesh.shape, config)
    if misfits:
        raise MeshError(misfits[0])


def mesh_misfits(sizes: Mapping[str, int], config: GptOssConfig) -> list[str]:
    """What axis sizes (``{"data": 1, "expert": 4, "tensor": 2}``) fail to divide; empty if none."""
    expert_shards = sizes["expert"] * sizes["tensor"]
    needs = (
        (config.num_experts, expert_shards, "experts", "expert x tensor"),
        (config.vocab_size, expert_shards, "vocabulary rows", "expert x tensor"),
        (config.num_key_value_heads, sizes["tensor"], "KV heads", "tensor"),
    )
    return [f"the model's {count} {what} do not divide over the mesh's {axes} = {shards} devices"
            for count, shards, what, axes in needs if count % shards]


def partition_spec(*logical_axes: str | None) -> PartitionSpec:
    """Logical axis names -> the mesh's ``PartitionSpec`` under :data:`LOGICAL_AXIS_RULES`."""
    rules = dict(LOGICAL_AXIS_RULES)
    return PartitionSpec(*(rules[name] if name is not None else None for name in logical_axes))


def parameter_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """The ``NamedSharding`` of every variable of ``state``, from its ``out_sharding`` metadata."""
    with nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        return nnx.get_named_sharding(state, mesh)


def shard_parameters(module: nnx.Module, mesh: Mesh) -> None:
    """Place every parameter of ``module`` on ``mesh`` by its metadata (abstract ones get their sharding)."""
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.device_put(state, parameter_shardings(state, mesh)))


def named_sharding(mesh: Mesh, *logical_axes: str | None) -> NamedSharding:
    """``NamedSharding(mesh, partition_spec(*logical_axes))``."""
    return NamedSharding(mesh, partition_spec(*logical_axes))


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join this process to a multi-host run: JAX's ``jax.distributed.initialize``.

    Call it in every process before anything touches a device; afterwards ``jax.devices()`` (and
    :func:`make_mesh`) span all processes. Arguments left None come from JAX's own detection
    (Slurm, Open MPI, Kubernetes) or from the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. On CPU-only processes (tests) the collectives
    go through gloo.

    Args:
      coordinator_address: ``host:port`` of process 0, reachable from every process.
      num_processes: how many processes take part.
      process_id: this process's index, ``0 ... num_processes - 1``.
    """
    environment = os.environ
    if coordinator_address is None:
        coordinator_address = environment.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in environment:
        num_processes = int(environment["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in environment:
        process_id = int(environment["JAX_PROCESS_ID"])
    # Only the CPU backend's collectives use this; without it a CPU-only run cannot span processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
