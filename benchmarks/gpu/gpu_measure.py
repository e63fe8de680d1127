"""What the GPU benchmarks share: the devices' datasheet peaks and kernel time with L2 evicted.

:func:`device_peaks` gives the dense bf16 tensor-core rate and the HBM bandwidth of a known
NVIDIA GPU, the physical limits every figure is a fraction of.

:func:`kernel_seconds` times a function by its kernels alone (CUPTI, through Mosaic GPU's
profiler), so a decode-sized call of a few microseconds is not swamped by the host's dispatch
time as a wall-clock timer would be. Before each timed call a 256 MB write evicts the L2 (50 MB
on an H100, 60 MB on an H200), so the operands come from HBM, as the model's are: a layer's
weights are not in L2 when its next step reads them. The eviction runs in the same program as
the timed call, just before it: ``profiler.measure`` runs its function once untimed first, and
an eviction in a program of its own would be followed by that warm-up, which puts the operands
back in L2 (decode-sized expert weights fit there) before the timed run.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

L2_EVICTION_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Peaks:
    """A device's datasheet limits."""

    bf16_flops: float  # dense bf16 tensor-core FLOP/s
    hbm_bytes_per_second: float


# By device_kind substring, most specific first: the H100 PCIe and NVL cards carry slower
# memory (and the PCIe card fewer multiprocessors) than the SXM part ("NVIDIA H100 80GB HBM3").
PEAKS: tuple[tuple[str, Peaks], ...] = (
    ("H200", Peaks(989e12, 4.8e12)),
    ("H100 PCIe", Peaks(756e12, 2.0e12)),
    ("H100 NVL", Peaks(835e12, 3.9e12)),
    ("H100", Peaks(989e12, 3.35e12)),
)


def device_peaks(device: jax.Device) -> Peaks | None:
    """The datasheet peaks of a known NVIDIA GPU; None elsewhere (the CPU, other GPUs)."""
    if device.platform != "gpu":
        return None
    for name, peaks in PEAKS:
        if name in device.device_kind:
            return peaks
    return None


def _evict_l2_first(fn: Callable) -> Callable:
    """``(buffer, *args) -> (buffer + 1, fn(*args))``, the write of ``buffer`` done first.

    The optimization barrier makes ``fn``'s operands wait for the write, so every kernel of
    ``fn`` that reads them runs after it.
    """

    def evicted_then_fn(buffer, *args):
        buffer, args = lax.optimization_barrier((buffer + 1, args))
        return buffer, fn(*args)

    return evicted_then_fn


def timed_kernels_seconds(
    kernels: Sequence[tuple[str, float]], eviction_kernels: Sequence[tuple[str, float]]
) -> float:
    """Seconds of the timed function's kernels in one profiled run of ``_evict_l2_first(fn)``.

    Args:
      kernels: ``(name, milliseconds)`` of every kernel the run launched, in launch order.
      eviction_kernels: the same for a run of the eviction alone, whose kernels the run's
        include in one stretch (a kernel of ``fn`` that reads none of its operands may come
        before them).
    """
    names = [name for name, _ in kernels]
    eviction = [name for name, _ in eviction_kernels]
    for start in range(len(names) - len(eviction)):
        if names[start : start + len(eviction)] == eviction:
            timed = [*kernels[:start], *kernels[start + len(eviction) :]]
            return sum(milliseconds for _, milliseconds in timed) / 1e3
    raise RuntimeError(f"expected the L2 eviction's kernels {eviction} and the timed function's "
                       f"among those launched, got {names}")


@functools.cache
def _eviction() -> tuple[jax.Array, list[tuple[str, float]]]:
    """The eviction's buffer and the kernels a run of the eviction alone launches (once per process)."""
    from jax.experimental.mosaic.gpu import profiler

    buffer = jnp.zeros((L2_EVICTION_BYTES // 4,), jnp.float32)
    _, eviction_kernels = profiler.measure(jax.jit(lambda b: b + 1), aggregate=False)(buffer)
    return buffer, eviction_kernels


def kernel_seconds(fn: Callable, *args, iters: int) -> float:
    """Median GPU time of ``fn(*args)``: its kernels' CUPTI times summed, L2 evicted first."""
    from jax.experimental.mosaic.gpu import profiler

    buffer, eviction_kernels = _eviction()
    measured = profiler.measure(jax.jit(_evict_l2_first(fn)), aggregate=False)
    times = []
    for _ in range(iters):
        _, kernels = measured(buffer, *args)
        times.append(timed_kernels_seconds(kernels, eviction_kernels))
    return statistics.median(times)
