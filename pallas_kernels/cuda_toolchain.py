"""CUDA releases whose compiler gets the kernels wrong.

ptxas from CUDA 12.8.0 up to (not including) 12.9.1 miscompiles masked attention: JAX's own
Hopper flash attention (``jax.experimental.pallas.ops.gpu.attention_mgpu``) refuses causal masks
there for that reason. The attention kernels here mask every tile (causal, window, cache
positions), so they refuse those releases too, and the model takes the XLA path there.
"""

from __future__ import annotations

# cudaRuntimeGetVersion's 1000 * major + 10 * minor + patch.
_FIRST_MISCOMPILING, _FIXED = 12080, 12091


def cuda_miscompiles_attention_masks() -> bool:
    """Whether the installed CUDA is one whose ptxas miscompiles masked attention."""
    from jax._src.lib import cuda_versions  # None without a CUDA plugin

    if cuda_versions is None:
        return False
    return _FIRST_MISCOMPILING <= cuda_versions.cuda_runtime_get_version() < _FIXED


def check_attention_toolchain(interpret) -> None:
    """Refuse to compile masked attention for the GPU with a miscompiling CUDA."""
    if not interpret and cuda_miscompiles_attention_masks():
        raise NotImplementedError(
            "the ptxas of CUDA 12.8.0 up to 12.9.0 miscompiles masked attention; install CUDA 12.9.1 or "
            "newer, or use the XLA path (kernels='xla')"
        )
