"""The first-use kernel check: a Pallas kernel proves itself on this GPU before the model trusts it.

Whatever the project's own GPU runs verify, a user's machine can differ: another driver, another
ptxas, another card of the family. So the first time ``auto`` would run a kernel on a given
combination (:func:`combination`: the GPU's name, the driver, the CUDA and ptxas versions, jax's
and jaxlib's versions and a hash of the kernels' sources), the kernel runs once at the model's
real shapes against its XLA reference (:mod:`gptoss_jax.kernel_check_cases`), in a child process
under a time limit: a kernel that crashes, or deadlocks on a barrier, takes the child down, not
the user's program. The verdict is kept in the cache folder, one JSON file per combination, so
the check runs once per combination and model shape.

Each kernel is one :class:`KernelCheck` of :data:`KERNEL_CHECKS` (Hopper's kernels) or
:data:`MMA_SYNC_KERNEL_CHECKS` (the ``mma.sync`` expert kernel, which runs on Ampere, Ada and
Blackwell instead): a new kernel is a new entry.
:func:`gptoss_jax.kernel_dispatch.kernel_decisions` asks for the verdicts; a kernel that fails
runs on XLA under ``auto`` (:func:`warn_fallback`: one warning line) and is refused when asked
for by name (:class:`KernelCheckFailedError`). ``GPTOSS_JAX_KERNEL_CHECK=0`` turns the check off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jax

from gptoss_jax.config import GptOssConfig
from gptoss_jax.errors import GptOssError
from gptoss_jax.cache_folder import cache_root
from gptoss_jax.kernel_check_cases import CaseResult, CheckSizes
from pallas_kernels import cuda_toolchain

CHECK_ENV_VAR = "GPTOSS_JAX_KERNEL_CHECK"
# The sources whose change makes every verdict stale: the kernels, their references and the cases.
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_CHECKED_SOURCES = ("pallas_kernels/*.py", "gptoss_jax/kernel_check_cases.py")
_NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")
_LOG = logging.getLogger(__name__)
# XLA's word for an allocation that failed; the child then needed more GPU memory than was free
# beside this process's share (XLA takes 75% of the GPU at its start, the CLI 95%).
_OUT_OF_MEMORY = "RESOURCE_EXHAUSTED"
_MEMORY_FIX = ("run `gptoss-jax env --check-kernels` while no model holds the GPU, or give XLA less of it "
               "(XLA_PYTHON_CLIENT_MEM_FRACTION)")
# "lookup": a cached verdict or none (gptoss-jax env); "first_use": run the check unless a verdict
# is cached (the model); "again": run it whatever is cached (gptoss-jax env --check-kernels).
CheckMode = Literal["lookup", "first_use", "again"]


@dataclasses.dataclass(frozen=True)
class KernelCheck:
    """One kernel's first-use check.

    Attributes:
      kernel: the kernel as users know it (``MoE experts``), as ``gptoss-jax env`` names it.
      part: the :class:`~gptoss_jax.kernel_dispatch.KernelPlan` field the kernel runs.
      cases: the case function the child runs, ``module:function``
        (:mod:`gptoss_jax.kernel_check_cases`).
      time_limit_s: seconds the child may take, its compiles included, before it is killed.
    """

    kernel: str
    part: str
    cases: str
    time_limit_s: float


# Time limits: about 10x what the child takes on an H100 by the compile costs in docs/gpu.md,
# so a slow CPU does not fail a good kernel, and a deadlock still ends within minutes.
KERNEL_CHECKS = (
    KernelCheck("MoE experts", "experts", "gptoss_jax.kernel_check_cases:check_experts", 300),
    KernelCheck("prefill attention", "prefill_attention", "gptoss_jax.kernel_check_cases:check_prefill_attention",
                180),
    KernelCheck("decode attention", "decode_attention", "gptoss_jax.kernel_check_cases:check_decode_attention",
                180),
)
# Where the mma.sync expert kernel runs (kernel_dispatch.MMA_SYNC_CAPABILITIES) it is the only kernel,
# so its check is the only one; a GPU never runs both expert kernels, and verdicts are per GPU.
MMA_SYNC_KERNEL_CHECKS = (
    KernelCheck("MoE experts (mma.sync)", "experts", "gptoss_jax.kernel_check_cases:check_experts_mma", 300),
)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How a kernel did: ``passed``, else ``error`` says why (a case beyond the tolerance, the crash, the time-out).

    ``cases`` describes each case run (none after a crash or a time-out). A check that could not
    run for want of GPU memory is not ``conclusive``: it is not kept, and the next run checks again.
    """

    kernel: str
    passed: bool
    error: str | None
    seconds: float
    cases: tuple[str, ...] = ()
    conclusive: bool = True

    def describe(self) -> str:
        """``passed its first-use check (41 s)``, ``failed its first-use check: <error>`` or ``could not run ...``."""
        if self.passed:
            return f"passed its first-use check ({self.seconds:.0f} s)"
        if not self.conclusive:
            return f"could not run its first-use check: {self.error}"
        return f"failed its first-use check: {self.error}"


class KernelCheckFailedError(GptOssError):
    """A kernel asked for by name (``kernels='pallas'``) failed its first-use check on this GPU."""

    def __init__(self, message: str, verdict: Verdict):
        super().__init__(message)
        self.verdict = verdict


def refusal(verdict: Verdict, asked: str, instead: str) -> str:
    """Why a kernel ``asked`` for (``--kernels pallas``) is refused, with what to do ``instead`` and report."""
    return (f"{asked}: the {verdict.kernel} kernel {verdict.describe()}; {instead} to run it on XLA, and "
            f"{_report()}")


def _report() -> str:
    return f"for a bug report, send the output of `gptoss-jax env --json` and {verdict_file(combination())}"


def checks_enabled() -> bool:
    """Whether the check runs: unless ``GPTOSS_JAX_KERNEL_CHECK=0``."""
    return os.environ.get(CHECK_ENV_VAR, "1").strip() != "0"


def _driver() -> str | None:
    """The NVIDIA driver's release (``550.54.15``), else the CUDA version it supports, else None."""
    with contextlib.suppress(OSError):
        match = re.search(r"Kernel Module\s+(\S+)", _NVIDIA_DRIVER_FILE.read_text())
        if match:
            return match.group(1)
    cuda = cuda_toolchain.cuda_versions_found()
    return None if cuda is None or cuda["driver"] is None else f"CUDA {cuda['driver']}"


def kernel_sources_hash() -> str:
    """A hash of the kernels', their references' and the check cases' sources (12 hex digits)."""
    digest = hashlib.sha256()
    for path in sorted(path for pattern in _CHECKED_SOURCES for path in _PACKAGE_ROOT.glob(pattern)):
        digest.update(path.relative_to(_PACKAGE_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def combination() -> dict[str, str | None]:
    """What a verdict holds for: the first device's GPU, the driver, CUDA, ptxas, jax, the kernels' sources."""
    import jaxlib

    cuda = cuda_toolchain.cuda_versions_found()
    ptxas = cuda_toolchain.ptxas_version()
    return {
        "gpu": jax.devices()[0].device_kind,
        "driver": _driver(),
        "cuda": None if cuda is None else cuda["runtime"],
        "ptxas": None if ptxas is None else ".".join(map(str, ptxas)),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "kernels": kernel_sources_hash(),
    }


def _key(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def verdict_file(facts: dict[str, str | None]) -> Path:
    """The combination's verdict file in the cache folder (``kernel-checks/<hash>.json``)."""
    return cache_root() / "kernel-checks" / f"{_key(facts)}.json"


def _shape_key(config: GptOssConfig, sizes: CheckSizes) -> str:
    """The model sizes a verdict holds for (a checkpoint of other sizes is checked anew)."""
    return _key({"config": config.to_dict(), "sizes": dataclasses.asdict(sizes)})


def _child_environment() -> dict[str, str]:
    environment = dict(
        os.environ,
        # This process's modules, wherever they came from (a test's fakes included).
        PYTHONPATH=os.pathsep.join(path for path in sys.path if path),
        # The parent's allocator already holds its share of the GPU: take only what the check needs.
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
    )
    # The parent's first device only: the check needs one GPU, and starting eight takes time and memory on each.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    environment["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0] if visible else "0"
    return environment


def _crash_reason(status: int, output: str) -> str:
    """``crashed (exit 1): ValueError: ...``: the exit and the last line the child printed."""
    how = f"signal {signal.Signals(-status).name}" if status < 0 else f"exit {status}"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return f"crashed ({how})" + (f": {lines[-1]}" if lines else "")


def run_kernel_check(check: KernelCheck, config: GptOssConfig, sizes: CheckSizes = CheckSizes(),
                     interpret: bool = False) -> Verdict:
    """Run ``check``'s cases for a ``config`` model in a child process; its verdict.

    The child runs in a process group of its own, killed whole when it ends or its time runs
    out, so nothing it started is left behind; it dies with this process too (Linux). ``interpret`` runs the kernels in Mosaic GPU
    interpret mode (on the CPU, at small ``sizes``: for testing the check itself).
    """
    with tempfile.TemporaryDirectory(prefix="gptoss-jax-kernel-check-") as folder:
        request, result, output = (Path(folder) / name for name in ("request.json", "result.json", "output.txt"))
        request.write_text(json.dumps({"run": check.cases, "config": config.to_dict(), "parent": os.getpid(),
                                       "sizes": dataclasses.asdict(sizes), "interpret": interpret}))
        command = [sys.executable, "-m", "gptoss_jax.kernel_check_cases", str(request), str(result)]
        start = time.monotonic()
        with output.open("w") as log:
            process = subprocess.Popen(command, env=_child_environment(), stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, process_group=0)
            try:
                status = process.wait(timeout=check.time_limit_s)
            except subprocess.TimeoutExpired:
                status = None
            finally:  # whatever the group still runs (all of it past the limit, or on Ctrl-C)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        seconds = time.monotonic() - start
        if status is None:
            return Verdict(check.kernel, False, f"timed out after {check.time_limit_s:.0f} s (the check was killed)",
                           seconds)
        if status != 0 or not result.exists():
            printed = output.read_text(errors="replace")
            if _OUT_OF_MEMORY in printed:  # says nothing of the kernel
                return Verdict(check.kernel, False, f"out of GPU memory ({_crash_reason(status, printed)}); "
                               f"{_MEMORY_FIX}", seconds, conclusive=False)
            return Verdict(check.kernel, False, _crash_reason(status, printed), seconds)
        results = [CaseResult(**fields) for fields in json.loads(result.read_text())]
    failed = [case for case in results if not case.passed]
    return Verdict(check.kernel, not failed, failed[0].describe() if failed else None, seconds,
                   tuple(case.describe() for case in results))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict[str, Any]]:
    """The verdict file's content, locked against other processes; written back (whole) on exit.

    The lock is held while a check runs, so processes started together (a server's workers)
    run it once: the others wait, then find the verdict.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        content = json.loads(path.read_text()) if path.exists() else {}
        before = json.dumps(content, sort_keys=True)
        yield content
        if json.dumps(content, sort_keys=True) != before:
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps(content, indent=2, sort_keys=True))
            os.replace(partial, path)


def kernel_verdict(check: KernelCheck, config: GptOssConfig, mode: CheckMode,
                   sizes: CheckSizes = CheckSizes()) -> Verdict | None:
    """``check``'s verdict on this combination for a ``config`` model: cached, or run as ``mode`` says.

    None when ``mode`` is ``lookup`` and none is cached, or when the check is off
    (:func:`checks_enabled`).
    """
    if not checks_enabled():
        return None
    facts = combination()
    path, shape = verdict_file(facts), _shape_key(config, sizes)
    if mode == "lookup":  # no lock: the file is replaced whole, never written in place
        content = json.loads(path.read_text()) if path.exists() else {}
        return _verdict(content.get("verdicts", {}).get(check.kernel, {}).get(shape))
    with _locked(path) as content:
        content["combination"] = facts
        verdicts = content.setdefault("verdicts", {}).setdefault(check.kernel, {})
        if shape in verdicts and mode == "first_use":
            return _verdict(verdicts[shape])
        verdict = run_kernel_check(check, config, sizes)
        if verdict.conclusive:
            verdicts[shape] = dataclasses.asdict(verdict)
        return verdict


def _verdict(fields: dict[str, Any] | None) -> Verdict | None:
    return None if fields is None else Verdict(**{**fields, "cases": tuple(fields["cases"])})


_warned: set[tuple[str, str | None]] = set()


def fallback_warning(verdict: Verdict) -> str:
    """The line a failed kernel's fallback prints: the kernel, the error and what to send in a bug report."""
    return f"gptoss-jax: the {verdict.kernel} kernel {verdict.describe()}; it runs on XLA instead; {_report()}"


def warn_fallback(verdict: Verdict) -> None:
    """Log :func:`fallback_warning` once per kernel and error in this process."""
    if (verdict.kernel, verdict.error) not in _warned:
        _warned.add((verdict.kernel, verdict.error))
        _LOG.warning(fallback_warning(verdict))
