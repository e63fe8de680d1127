"""CUDA releases whose compiler gets the kernels wrong.

ptxas from CUDA 12.8.0 up to (not including) 12.9.1 miscompiles masked attention: JAX's own
Hopper flash attention (``jax.experimental.pallas.ops.gpu.attention_mgpu``) refuses causal masks
there for that reason. The attention kernels here mask every tile (causal, window, cache
positions), so they refuse those releases too, and the model takes the XLA path there.

What decides is the ptxas that compiles the kernels, not the CUDA runtime. Mosaic GPU (the
0.11.2 plugins) runs the ``ptxas`` on ``PATH``, else ``/usr/local/cuda/bin/ptxas`` (its search,
seen with strace; it does not use the pip ``nvidia-cuda-nvcc`` package's), and its
``--version`` names the exact build: CUDA 12.8.0's is V12.8.61, 12.9.0's V12.9.41 and the fixed
12.9.1's V12.9.86 (the pins of PyPI's ``cuda-toolkit`` releases). ``cudaRuntimeGetVersion()``
cannot tell them apart: it returns ``1000 * major + 10 * minor``, 12090 for every 12.9.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

_FIRST_MISCOMPILING = (12, 8, 0)
_FIXED = (12, 9, 86)  # CUDA 12.9.1's ptxas
_FALLBACK_PTXAS = "/usr/local/cuda/bin/ptxas"


def mosaic_ptxas() -> str | None:
    """The ptxas Mosaic GPU compiles with: the one on PATH, else CUDA's default install's."""
    found = shutil.which("ptxas")
    if found is None and shutil.which(_FALLBACK_PTXAS):
        found = _FALLBACK_PTXAS
    return found


def parse_ptxas_version(text: str) -> tuple[int, int, int] | None:
    """``(major, minor, build)`` from ``ptxas --version``'s ``V12.9.86``; None if absent."""
    match = re.search(r"\bV(\d+)\.(\d+)\.(\d+)\b", text)
    return tuple(int(part) for part in match.groups()) if match else None


@functools.cache
def ptxas_version() -> tuple[int, int, int] | None:
    """The version of :func:`mosaic_ptxas`, or None when there is none (or it does not run)."""
    ptxas = mosaic_ptxas()
    if ptxas is None:
        return None
    try:
        result = subprocess.run([ptxas, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_ptxas_version(result.stdout)


# What goes wrong and its fix, as every message about it says them.
MISCOMPILES = "the ptxas of CUDA 12.8.0 up to 12.9.0 miscompiles masked attention"
FIX = "put CUDA 12.9.1's ptxas (V12.9.86) or newer first on PATH"


def miscompiling_toolchain() -> str | None:
    """What would compile the kernels wrongly here (``ptxas 12.8.61``), or None if nothing would.

    Without a CUDA plugin nothing is compiled for a GPU. Without a ptxas to ask, the runtime's
    major version decides: CUDA 12 is refused (its 12.9.0 and 12.9.1 read the same), 13 is not.
    """
    from jax._src.lib import cuda_versions  # None without a CUDA plugin

    if cuda_versions is None:
        return None
    version = ptxas_version()
    if version is None:
        return "CUDA 12 with no ptxas to ask" if cuda_versions.cuda_runtime_get_version() < 13000 else None
    if _FIRST_MISCOMPILING <= version < _FIXED:
        return f"ptxas {'.'.join(map(str, version))}"
    return None


def cuda_versions_found() -> dict[str, str | None] | None:
    """The CUDA runtime and driver versions (``12.9``) the CUDA plugin sees; None without a plugin."""
    from jax._src.lib import cuda_versions  # None without a CUDA plugin

    if cuda_versions is None:
        return None
    found: dict[str, str | None] = {}
    for name, get_version in (("runtime", cuda_versions.cuda_runtime_get_version),
                              ("driver", cuda_versions.cuda_driver_get_version)):
        try:
            version = get_version()
        except Exception:  # noqa: BLE001 - no driver to ask: say so; a report must not fail on it
            found[name] = None
            continue
        found[name] = f"{version // 1000}.{version % 1000 // 10}"
    return found


def cuda_miscompiles_attention_masks() -> bool:
    """Whether the kernels would be compiled by a ptxas that miscompiles masked attention."""
    return miscompiling_toolchain() is not None


def check_attention_toolchain(interpret) -> None:
    """Refuse to compile masked attention for the GPU with a miscompiling ptxas."""
    culprit = None if interpret else miscompiling_toolchain()
    if culprit is not None:
        raise NotImplementedError(
            f"{MISCOMPILES} ({culprit}); {FIX}, or use the XLA path (kernels='xla')"
        )
