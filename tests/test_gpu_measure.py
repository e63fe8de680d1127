"""benchmarks/gpu/gpu_measure.py: device peaks, and the L2 eviction kept out of kernel times."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from benchmarks.gpu import gpu_measure
from benchmarks.gpu.gpu_measure import Peaks, device_peaks, kernel_seconds, timed_kernels_seconds


def test_peaks_of_known_gpus_and_none_elsewhere():
    assert device_peaks(jax.devices("cpu")[0]) is None
    for kind, peaks in [("NVIDIA H100 80GB HBM3", Peaks(989e12, 3.35e12)),
                        ("NVIDIA H100 PCIe", Peaks(756e12, 2.0e12)),
                        ("NVIDIA H100 NVL", Peaks(835e12, 3.9e12)),
                        ("NVIDIA H200", Peaks(989e12, 4.8e12)),
                        ("NVIDIA A100-SXM4-80GB", None)]:
        assert device_peaks(SimpleNamespace(platform="gpu", device_kind=kind)) == peaks


def test_the_eviction_comes_before_every_kernel_that_reads_the_operands():
    def fn(x, y):
        return jnp.tanh(x) @ y

    jaxpr = jax.make_jaxpr(gpu_measure._evict_l2_first(fn))(
        jnp.zeros(1024), jnp.ones((4, 4)), jnp.ones((4, 4))
    ).jaxpr
    buffer, *operands = jaxpr.invars
    (barrier,) = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    (eviction,) = [e for e in jaxpr.eqns if buffer in e.invars]
    assert eviction.outvars[0] in barrier.invars and set(operands) <= set(barrier.invars)
    # Past the barrier nothing reads the operands themselves, only the barrier's copies of them.
    after = jaxpr.eqns[jaxpr.eqns.index(barrier) + 1 :]
    assert after and not any(set(operands) & set(e.invars) for e in after)

    buffer_out, out = jax.jit(gpu_measure._evict_l2_first(fn))(jnp.zeros(8), jnp.ones((4, 4)), 2 * jnp.eye(4))
    assert (buffer_out == 1).all() and jnp.allclose(out, 2 * jnp.tanh(1.0))


def test_kernel_times_leave_out_the_eviction():
    eviction = [("loop_add_fusion", 0.120)]
    run = [("loop_add_fusion", 0.121), ("mosaic_gpu_kernel", 0.015), ("loop_convert_fusion", 0.002)]
    assert timed_kernels_seconds(run, eviction) == pytest.approx(17e-6)
    # A kernel that reads none of the operands may run before the eviction; it counts.
    early = [("iota_fusion", 0.001), *run]
    assert timed_kernels_seconds(early, eviction) == pytest.approx(18e-6)


@pytest.mark.parametrize("run", [
    [("loop_add_fusion", 0.12)],  # nothing of the timed function's
    [("mosaic_gpu_kernel", 0.015)],  # no eviction: the operands may have come from L2
    [("loop_add_fusion_1", 0.12), ("mosaic_gpu_kernel", 0.015)],
])
def test_kernel_times_refuse_a_run_without_the_eviction_or_the_function(run):
    with pytest.raises(RuntimeError, match="L2 eviction"):
        timed_kernels_seconds(run, [("loop_add_fusion", 0.12)])


def test_kernel_seconds_on_the_gpu(gpu):
    x = jnp.ones((2048, 2048), jnp.bfloat16)
    seconds = kernel_seconds(jax.jit(lambda a: a @ a), x, iters=3)
    assert math.isfinite(seconds) and 0 < seconds < 1
