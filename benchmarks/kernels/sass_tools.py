"""The compiler tools of :mod:`benchmarks.kernels.kernel_sass`: the CUDA plugin and CUDA's binaries from PyPI,
and a stand-in CUDA driver.

Installed once with pip (``--no-deps --target``, about 500 MB) under a folder of the user's cache:
the PJRT plugin of the device image's jax-cuda13 0.11.2 (whose ``MosaicGpuCompile`` takes a
kernel through PTX and ptxas), CUDA 13.0's ptxas and nvlink and an nvdisasm. The stand-in
``libcuda.so.1`` (``stand_in_libcuda.c``, built here with the machine's C compiler) answers the
plugin's questions about the device as a GPU of the compute capability in
``$GPTOSS_STAND_IN_COMPUTE_CAPABILITY`` would (a Hopper GPU's 9.0 by default) and refuses to load
a module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.kernels.sass_reading import CompileError

REPOSITORY = Path(__file__).resolve().parents[2]
DRIVER_SOURCE = Path(__file__).with_name("stand_in_libcuda.c")
DEFAULT_TOOLS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptoss-jax" / "kernel-sass"
# jax-cuda13-pjrt is the device image's plugin at the project's jax; nvcc 13.0.88 is this
# machine's CUDA 13.0; 13.2.51 is the oldest CUDA 13 nvdisasm on PyPI.
TOOL_PINS = ("jax-cuda13-pjrt==0.11.2", "nvidia-cuda-nvcc==13.0.88", "nvidia-cuda-nvdisasm==13.2.51")


@dataclasses.dataclass(frozen=True)
class Tools:
    site: Path  # pip --target folder: jax_plugins.xla_cuda13 and the nvidia/cu13 binaries
    cuda_root: Path  # bin/ptxas, bin/nvlink, bin/nvdisasm
    driver_dir: Path  # the stand-in libcuda.so.1

    @property
    def ptxas_version(self) -> str:
        out = subprocess.run([self.cuda_root / "bin" / "ptxas", "--version"], capture_output=True, text=True)
        release = [line for line in out.stdout.splitlines() if "release" in line]
        return "ptxas " + (release[0].split("tools, ")[-1] if release else out.stdout.strip())

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in [n for n in env if n.startswith("MOSAIC_GPU_")]:
            del env[name]

        def path(name: str, first: Path | str) -> str:
            return os.pathsep.join([str(first), *filter(None, [env.get(name)])])

        env.update(
            JAX_PLATFORMS="cpu",
            CUDA_ROOT=str(self.cuda_root),  # jax points Mosaic GPU's nvdisasm here
            PATH=path("PATH", self.cuda_root / "bin"),  # ...and Mosaic GPU's ptxas is PATH's first
            LD_LIBRARY_PATH=path("LD_LIBRARY_PATH", self.driver_dir),
            PYTHONPATH=path("PYTHONPATH", os.pathsep.join([str(self.site), str(REPOSITORY)])),
        )
        return env


def installed_tools(root: Path = DEFAULT_TOOLS, ptxas: Path | None = None) -> Tools | None:
    """The tools under ``root`` if a previous :func:`install_tools` completed, else None."""
    site = root / "site"
    if (site / ".pins").is_file() and (site / ".pins").read_text() == "\n".join(TOOL_PINS):
        return Tools(site, _cuda_root(root, site, ptxas), _driver(root))
    return None


def install_tools(root: Path = DEFAULT_TOOLS, ptxas: Path | None = None) -> Tools:
    """The tools, installed under ``root`` with pip (and the stand-in driver built) if missing."""
    if (tools := installed_tools(root, ptxas)) is not None:
        return tools
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="site-", dir=root))
    print(f"installing {' '.join(TOOL_PINS)} into {root} (about 500 MB, once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", staging,
                    *TOOL_PINS], check=True)
    (staging / ".pins").write_text("\n".join(TOOL_PINS))
    shutil.rmtree(root / "site", ignore_errors=True)
    staging.rename(root / "site")
    return Tools(root / "site", _cuda_root(root, root / "site", ptxas), _driver(root))


def _cuda_root(root: Path, site: Path, ptxas: Path | None) -> Path:
    """A CUDA folder of links: the chosen (default: the pinned) ptxas with its nvlink, and nvdisasm."""
    wheel_bin = site / "nvidia" / "cu13" / "bin"
    ptxas = Path(ptxas).resolve() if ptxas else wheel_bin / "ptxas"
    nvlink = ptxas.with_name("nvlink") if ptxas.with_name("nvlink").exists() else wheel_bin / "nvlink"
    name = hashlib.sha256(str(ptxas).encode()).hexdigest()[:12]
    bin_dir = root / f"cuda-{name}" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for link, target in (("ptxas", ptxas), ("nvlink", nvlink), ("nvdisasm", wheel_bin / "nvdisasm")):
        if not target.exists():
            raise CompileError(f"{target} does not exist")
        (bin_dir / link).unlink(missing_ok=True)
        (bin_dir / link).symlink_to(target)
    return bin_dir.parent


def _driver(root: Path) -> Path:
    """The folder of the stand-in ``libcuda.so.1``, built from its C source unless already built."""
    source = DRIVER_SOURCE.read_bytes()
    folder = root / f"driver-{hashlib.sha256(source).hexdigest()[:12]}"
    library = folder / "libcuda.so.1"
    if not library.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise CompileError("no C compiler (cc, gcc or $CC) to build the stand-in libcuda.so.1")
        folder.mkdir(parents=True, exist_ok=True)
        built = folder / f"libcuda.so.1.{os.getpid()}"
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", built, DRIVER_SOURCE], check=True)
        built.rename(library)
    return folder
