"""The NVIDIA GPUs the benchmarks reason about: datasheet facts, and compile-only devices of them.

One table (:data:`GPU_TARGETS`) holds what NVIDIA's datasheets and architecture whitepapers
give for each card: compute capability, multiprocessors, memory as sold, memory bandwidth, L2,
boost clock, dense bf16 tensor throughput with float32 accumulation, and the per-multiprocessor
limits of its architecture. The cost model's device rows and the memory benchmarks read it.

:func:`compile_only_device` turns a row into a device of XLA's GPU compiler without a GPU
(``../shared/docs/design.md``, "Testing without a GPU", item 7): the CUDA PJRT plugin builds a
topology from a ``GpuTargetConfigProto``, and ``jax.jit(f).lower(...).compile()`` for its
device runs the real GPU pipeline (fusions, Triton GEMMs, buffer assignment) on the CPU. The
plugin and the stand-in driver come from :mod:`benchmarks.kernels.sass_tools`, and must be on the
import and library paths before JAX starts (:func:`deviceless_environment`).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax

GB = 1e9
"""Memory as sold is in GB of 1e9 bytes here: a card sold as 16 GB has 16 GiB (17.2e9 bytes),
less what the driver keeps, so fits judged against it err on the side of not fitting. XLA's
compiler is told the GiB (:meth:`GpuTarget.target_config`), near what the driver reports: it
schedules and rematerializes against 80% of it."""


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One GPU's datasheet facts."""

    name: str  # as the tables name it
    device_kind: str  # as the driver names it (``jax.Device.device_kind``)
    compute_capability: tuple[int, int]
    sms: int
    memory_bytes: float  # as sold (:data:`GB`)
    bandwidth_bytes_per_second: float
    bf16_flops: float  # dense bf16 tensor-core FLOP/s, float32 accumulation
    l2_bytes: int
    boost_clock_hz: float

    @property
    def sm_version(self) -> str:
        """``sm_89``: what ptxas and Mosaic GPU call the target."""
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def _limits(self) -> _ArchitectureLimits:
        return _ARCHITECTURE_LIMITS[self.compute_capability]

    def target_config(self) -> str:
        """The ``GpuTargetConfigProto`` text that makes XLA's GPU compiler target this GPU."""
        limits = self._limits
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {limits.shared_memory_per_sm}
  threads_per_core_limit: {limits.threads_per_sm}
  core_count: {self.sms}
  fpus_per_core: {limits.fp32_lanes_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth_bytes_per_second)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.boost_clock_hz / 1e9}
  device_memory_size: {int(self.memory_bytes / GB * 2**30)}
  shared_memory_per_block_optin: {limits.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 3 }}
device_description_str: "{self.device_kind}"
"""


@dataclasses.dataclass(frozen=True)
class _ArchitectureLimits:
    """Per-multiprocessor limits of a compute capability (CUDA C Programming Guide, table 21)."""

    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    threads_per_sm: int
    fp32_lanes_per_sm: int


_ARCHITECTURE_LIMITS = {
    (8, 0): _ArchitectureLimits(167936, 166912, 2048, 64),
    (8, 9): _ArchitectureLimits(102400, 101376, 1536, 128),
    (9, 0): _ArchitectureLimits(233472, 232448, 2048, 128),
    (12, 0): _ArchitectureLimits(102400, 101376, 1536, 128),
}

_MB = 1 << 20
# From NVIDIA's datasheets (memory, bandwidth, dense tensor FLOP/s) and architecture whitepapers
# (SMs, L2, boost clock). GeForce cards do bf16 with float32 accumulation at half the rate of
# float16 accumulation, the figure their datasheets lead with.
GPU_TARGETS: tuple[GpuTarget, ...] = (
    GpuTarget("RTX 4060 Ti 16 GB", "NVIDIA GeForce RTX 4060 Ti", (8, 9), 34, 16 * GB, 288e9, 44.2e12, 32 * _MB,
              2.535e9),
    GpuTarget("RTX 4090", "NVIDIA GeForce RTX 4090", (8, 9), 128, 24 * GB, 1008e9, 165.2e12, 72 * _MB, 2.52e9),
    GpuTarget("L4", "NVIDIA L4", (8, 9), 58, 24 * GB, 300e9, 121e12, 48 * _MB, 2.04e9),
    GpuTarget("A100 40 GB", "NVIDIA A100-SXM4-40GB", (8, 0), 108, 40 * GB, 1555e9, 312e12, 40 * _MB, 1.41e9),
    GpuTarget("A100 80 GB", "NVIDIA A100-SXM4-80GB", (8, 0), 108, 80 * GB, 2039e9, 312e12, 40 * _MB, 1.41e9),
    GpuTarget("RTX 5090", "NVIDIA GeForce RTX 5090", (12, 0), 170, 32 * GB, 1792e9, 209.5e12, 96 * _MB, 2.41e9),
    GpuTarget("H100 80 GB", "NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * GB, 3.35e12, 989e12, 50 * _MB, 1.98e9),
    GpuTarget("H200 141 GB", "NVIDIA H200", (9, 0), 132, 141 * GB, 4.8e12, 989e12, 50 * _MB, 1.98e9),
)


def gpu_target(name: str) -> GpuTarget:
    """The row of :data:`GPU_TARGETS` called ``name``.

    Raises:
      KeyError: with the names there are.
    """
    for target in GPU_TARGETS:
        if target.name == name:
            return target
    raise KeyError(f"no GPU called {name!r}; known: {', '.join(t.name for t in GPU_TARGETS)}")


def compile_only_device(target: GpuTarget) -> jax.Device:
    """A device of ``target`` that XLA's GPU compiler compiles for and nothing runs on.

    Compile for it with ``jax.default_device(device)`` around ``jax.jit(f).lower(...)``, or
    with its ``SingleDeviceSharding`` on the arguments. Needs the process started in
    :func:`deviceless_environment`.

    Raises:
      RuntimeError: when the CUDA plugin cannot be loaded (not started in that environment).
    """
    from jax._src import xla_bridge

    try:
        topology = xla_bridge.make_pjrt_topology("cuda", "", topology="1x1x1", target_config=target.target_config())
    except Exception as error:  # the plugin raises its own types; say what to do
        raise RuntimeError(f"XLA's CUDA compiler is not available here ({error}); run in "
                           "benchmarks.gpu.gpu_targets.deviceless_environment()") from error
    return topology._make_compile_only_devices()[0]


def deviceless_environment() -> dict[str, str] | None:
    """The environment that lets a new process compile for GPUs deviceless: the CUDA plugin on
    the import path and the stand-in driver first on the library path, ``JAX_PLATFORMS=cpu``.

    None when the tools are not installed (``python -m benchmarks.kernels.kernel_sass`` installs them,
    about 500 MB, once), so a caller can say so and fall back.
    """
    from benchmarks.kernels.sass_tools import installed_tools

    tools = installed_tools()
    return None if tools is None else tools.environment()


def in_deviceless_environment() -> bool:
    """Whether this process was started with :func:`deviceless_environment`'s paths."""
    from benchmarks.kernels.sass_tools import installed_tools

    tools = installed_tools()
    return tools is not None and str(tools.driver_dir) in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)


def restart_deviceless(module: str) -> None:
    """Start this program again (``python -m module`` with the same arguments) in
    :func:`deviceless_environment`, unless it already runs there; the tools are installed first
    if missing (:func:`benchmarks.kernels.sass_tools.install_tools`, about 500 MB, once).
    """
    from benchmarks.kernels.sass_tools import install_tools

    if not in_deviceless_environment():
        environment = install_tools().environment()
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], environment)
