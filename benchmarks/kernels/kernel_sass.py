"""Every Pallas kernel compiled to SASS on the CPU: ptxas' registers and spills, the launch's
shared memory, CTAs per SM, and the instruction mix of the kernel's main loop, per kernel config
at gpt-oss's shapes, on one GPU and at one device's shapes on each mesh of
:mod:`benchmarks.kernels.sharded_kernels` (:func:`benchmarks.kernels.kernel_cases.shard_cases`), and each kernel's
non-default variants at decode shapes (:func:`benchmarks.kernels.kernel_cases.variant_cases`); and the
``mma.sync`` expert kernel for the GPUs before and after Hopper (sm_80, sm_89, sm_120) at
gpt-oss-20b's decode shapes (:func:`benchmarks.kernels.kernel_cases.mma_cases`). No GPU is needed or used.

  python -m benchmarks.kernels.kernel_sass [--only moe flash decode moe-mma] [--check] [--write] [--sass DIR] [--jobs N]

``--write`` replaces this tool's sections of ``benchmarks/RESULTS.md`` (one for the Hopper
kernels, one for the ``mma.sync`` kernel: those of the kernels compiled) with the tables and
writes each main loop's instruction counts, by mnemonic, to ``benchmarks/kernels/main_loops.json``
(what :mod:`benchmarks.kernels.kernel_cost` reads; the entries of the section not compiled are
kept); ``--sass DIR`` writes each kernel's whole SASS there, for reading (the dumps are
regenerated on demand, not committed). Other tools take the figures from
:func:`compile_kernels` (a :class:`KernelReport` per case), with their own cases
(:mod:`benchmarks.kernels.kernel_cases`: built from a config with ``gpt_oss_cases``, one with a shard's
sizes giving that shard's, or directly).

How (design.md, testing without a GPU, item 6). ``jax.export`` for ``cuda`` lowers a kernel to
its Mosaic GPU module (``mosaic.gpu.core.KNOWN_KERNELS``); the CUDA 13 PJRT plugin's
``MosaicGpuCompile`` takes it through LLVM, PTX and ptxas for the device's target (``sm_90a``
on Hopper), printing ptxas' report, the SASS and the host code that launches it
(``MOSAIC_GPU_DUMP_*``); its launch call names the grid, the threads and the dynamic shared
memory. The plugin asks the CUDA driver for the compute capability first, so a stand-in
``libcuda.so.1`` (``stand_in_libcuda.c``, built here with the machine's C compiler) answers the
case's (``$GPTOSS_STAND_IN_COMPUTE_CAPABILITY``, 9.0 for the Hopper kernels), and the case
lowers for the same one (:func:`benchmarks.kernels.kernel_cases.lowering_for`). Loading the module then
fails, which is where the compile stops.

The tools (:mod:`benchmarks.kernels.sass_tools`; about 500 MB, installed once with pip into ``--tools``,
by default ``~/.cache/gptoss-jax/kernel-sass``): the PJRT plugin of the device image's jax-cuda13 0.11.2,
CUDA 13.0's ptxas and nvlink (the ``nvidia-cuda-nvcc`` wheel, the same 13.0.88 as this machine's
``/usr/local/cuda``) and an nvdisasm (the oldest CUDA 13 one on PyPI). Mosaic GPU runs the
``ptxas`` first on ``PATH``, so they go first on the worker's ``PATH``; ``--ptxas`` compiles with
another.

What the columns count. *Registers* and *spills* are ptxas' (``-v``); *SMEM* is the launch's
dynamic shared memory plus ptxas' static bytes. *CTAs/SM*: by registers, 65536 per SM allocated
per warp in units of 256; by shared memory, 228 KB per SM with 1 KB reserved per CTA; the
smaller of the two (and of 32). *The main loop* is the pipeline loop of the SASS
(:mod:`benchmarks.kernels.sass_reading` says how it is found): the K-step pipeline loop of the expert
matmul (with its scales folded, as gpt-oss's are), the KV-tile loop of both attention kernels,
one iteration of one warp; its classes are
:data:`benchmarks.kernels.sass_reading.INSTRUCTION_CLASSES`. For the expert matmul, *per weight byte*
divides a class's count times the CTA's warps by the packed weight bytes one iteration decodes
(``halves * 64 * block_kb``): an SM issues at most 4 warp instructions a cycle, so 4 over the
total is the most weight bytes per cycle an SM can decode.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.kernels.kernel_cases import Case, gpt_oss_cases, mma_cases, shard_cases, sm_name, variant_cases
from benchmarks.kernels.sass_tools import DEFAULT_TOOLS, TOOL_PINS, Tools, install_tools
from benchmarks.kernels.sass_reading import (
    CLASS_NAMES,
    CompileError,
    Launch,
    PtxasReport,
    count_classes,
    main_loop,
    main_loop_mnemonics,
    parse_launch,
    parse_ptxas,
    split_dump,
)

REPOSITORY = Path(__file__).resolve().parents[2]
RESULTS_MD = REPOSITORY / "benchmarks" / "RESULTS.md"
MAIN_LOOPS = Path(__file__).with_name("main_loops.json")
SECTION_TITLE = "## Kernels compiled to SASS on the CPU"
MMA_SECTION_TITLE = "## The mma.sync expert kernel compiled to SASS on the CPU (sm_80, sm_89, sm_120)"
MMA_LOOP_PREFIX = "moe-mma-"  # the mma.sync kernel's entries of main_loops.json
TARGET = "sm_90a"
STAND_IN_CAPABILITY = "GPTOSS_STAND_IN_COMPUTE_CAPABILITY"  # read by stand_in_libcuda.c: ptxas' target

REGISTERS_PER_SM = 65536  # on every target here
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
MAX_REGISTERS = 255
SMEM_RESERVED_PER_CTA = 1024
SMEM_UNIT = 128
ISSUE_PER_SM = 4  # warp instructions per cycle: one per scheduler


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """A compute capability's per-SM occupancy limits (CUDA C Programming Guide, "Technical
    Specifications per Compute Capability")."""

    smem: int  # shared memory per SM, bytes
    max_ctas: int
    max_warps: int


SM_LIMITS = {
    "9.0": SmLimits(228 * 1024, 32, 64),
    "8.0": SmLimits(164 * 1024, 32, 64),
    "8.6": SmLimits(100 * 1024, 16, 48),
    "8.9": SmLimits(100 * 1024, 24, 48),
    "10.0": SmLimits(228 * 1024, 32, 64),
    "12.0": SmLimits(100 * 1024, 32, 48),
}


# ---------------------------------------------------------------------------------------------
# Reports: what ptxas, the launch and the SASS say about one case.

@dataclasses.dataclass(frozen=True)
class KernelReport:
    """One compiled case. ``loop`` counts the main loop's instructions by class (one warp)."""

    case: Case
    ptxas: PtxasReport
    launch: Launch
    loop: dict[str, int]
    sass: str

    @property
    def registers(self) -> int:
        return self.ptxas.registers

    @property
    def smem(self) -> int:
        return self.launch.dynamic_smem + self.ptxas.static_smem

    @property
    def warps(self) -> int:
        return math.ceil(self.launch.threads / 32)

    @property
    def limits(self) -> SmLimits:
        return SM_LIMITS[self.case.arch]

    @property
    def ctas_by_registers(self) -> int:
        per_warp = math.ceil(self.registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
        return min(REGISTERS_PER_SM // per_warp, self.limits.max_warps) // self.warps

    @property
    def ctas_by_smem(self) -> int:
        per_cta = math.ceil(self.smem / SMEM_UNIT) * SMEM_UNIT + SMEM_RESERVED_PER_CTA
        return self.limits.smem // per_cta

    @property
    def ctas_per_sm(self) -> int:
        return min(self.ctas_by_registers, self.ctas_by_smem, self.limits.max_ctas)

    @property
    def loop_total(self) -> int:
        return sum(self.loop.values())

    def per_weight_byte(self, name: str | None = None) -> float:
        """Warp instructions of a class (None: all) per packed weight byte (expert matmul only)."""
        count = self.loop_total if name is None else self.loop[name]
        return count * self.warps / self.case.weight_bytes_per_step()


# The register budget (what --check holds every kernel to): registers need not allow more CTAs
# per SM than shared memory does, nor more than 4 (16 warps, 4 per scheduler), so a kernel's
# budget is the most registers that still allow that many.
TARGET_CTAS_PER_SM = 4
# Flash attention is held to the cap instead: its 128-row tile (16 tokens x 8 heads) holds the
# [128, 64] float32 accumulator and scores and the bf16 probabilities, 160 registers a thread;
# ptxas needs 205 without the masks and spills below 255 with them (at 248: 12 bytes), so it runs
# 2 CTAs per SM where shared memory would allow 4. A 64-row tile (block_q=8) needs 136.
FLASH_REGISTER_BUDGET = MAX_REGISTERS


def registers_allowing(ctas: int, threads: int) -> int:
    """The most registers per thread with which ``ctas`` CTAs of ``threads`` fit on one SM."""
    per_warp = REGISTERS_PER_SM // (max(ctas, 1) * math.ceil(threads / 32)) // REGISTER_UNIT * REGISTER_UNIT
    return min(MAX_REGISTERS, per_warp // 32)


# The mma.sync expert kernel is held to 2 CTAs per SM: gpt-oss-20b's decode grids (180 CTAs at
# one token) then run in one wave on the GPUs it serves (108 to 170 SMs), and 8 warps an SM keep
# its cp.async pipeline's bytes in flight (benchmarks.kernels.kernel_cost's section on it). On an A100's
# 164 KB of shared memory 4 CTAs would fit, which registers need not allow.
MMA_TARGET_CTAS_PER_SM = 2


# On sm_120 ptxas guards each TMA copy (Mosaic GPU copies with TMA from compute capability 9.0
# on) with a call taken only when the copy's barrier lies in another CTA's shared memory (it
# compares the address with the CTA's cluster rank; never so here): its 8-byte argument buffer is
# the kernel's only stack, no spill.
ALLOWED_STACK_FRAME = {"12.0": 8}


def register_budget(report: KernelReport) -> int:
    if report.case.kernel == "flash":
        return FLASH_REGISTER_BUDGET
    target = MMA_TARGET_CTAS_PER_SM if report.case.kernel == "moe_mma" else TARGET_CTAS_PER_SM
    return registers_allowing(min(report.ctas_by_smem, target), report.launch.threads)


def violations(report: KernelReport) -> list[str]:
    """What the check refuses in one compiled kernel: spills or local memory, ptxas warnings, and
    registers over :func:`register_budget`."""
    found = []
    p = report.ptxas
    if p.spill_stores or p.spill_loads or p.stack_frame > ALLOWED_STACK_FRAME.get(report.case.arch, 0):
        found.append(f"spills {p.spill_stores} B stored / {p.spill_loads} B loaded, stack frame {p.stack_frame} B")
    found += [f"ptxas: {w}" for w in p.warnings]
    if report.registers > (budget := register_budget(report)):
        found.append(f"{report.registers} registers, over its budget of {budget}")
    return [f"{report.case.name}: {v}" for v in found]


def report(case: Case, output: str) -> KernelReport:
    ptxas, sass, host = split_dump(output)
    return KernelReport(case, parse_ptxas(ptxas), parse_launch(host), count_classes(main_loop(sass)), sass)


# ---------------------------------------------------------------------------------------------
# The tools and the compile.

def compile_kernels(cases: Sequence[Case], tools: Tools | None = None, jobs: int = 2) -> list[KernelReport]:
    """Compile each case to SASS on the CPU and read its report; the tools are installed if needed.

    Raises :class:`CompileError` naming every case that failed.
    """
    tools = tools or install_tools()
    cases = list(cases)
    # The plugin keeps the first compute capability it is told for the rest of its process, so
    # each worker compiles for one: the cases of each target, split over up to ``jobs`` workers.
    chunks = []
    for arch in dict.fromkeys(case.arch for case in cases):
        mine = [i for i, case in enumerate(cases) if case.arch == arch]
        ways = max(1, min(jobs, len(mine)))
        chunks += [(arch, mine[j::ways]) for j in range(ways)]
    with tempfile.TemporaryDirectory(prefix="kernel-sass-") as scratch:
        scratch = Path(scratch)
        running, worker_errors = [], []
        for j, (arch, mine) in enumerate(chunks):
            if len(running) >= max(1, jobs):
                worker_errors.append(running.pop(0).communicate()[1])
            (scratch / f"cases-{j}.pickle").write_bytes(pickle.dumps([(i, cases[i]) for i in mine]))
            command = [sys.executable, "-m", "benchmarks.kernels.kernel_sass", "--worker", str(scratch / f"cases-{j}.pickle"),
                       str(scratch)]
            running.append(subprocess.Popen(command, cwd=REPOSITORY, env=tools.environment() | {STAND_IN_CAPABILITY: arch},
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        worker_errors += [w.communicate()[1] for w in running]
        reports, failures = [], []
        for i, case in enumerate(cases):
            output, error = scratch / f"{i}.out", scratch / f"{i}.error"
            try:
                if error.exists():
                    raise CompileError(error.read_text())
                if not output.exists():
                    raise CompileError("the worker died before it:\n" + "\n".join(e[-3000:] for e in worker_errors))
                reports.append(report(case, output.read_text(errors="replace")))
            except CompileError as e:
                failures.append(f"{case.name}: {e}")
    if failures:
        raise CompileError("\n\n".join(failures))
    return reports


def _compile_in_worker(cases_file: Path, out_dir: Path) -> None:
    """Worker process (the tools' environment): lower and compile each case, writing its dumps."""
    import jax_plugins.xla_cuda13 as plugin
    from jax.experimental.mosaic.gpu import core

    compile_module = ctypes.CDLL(str(plugin._get_library_path())).MosaicGpuCompile
    compile_module.argtypes = [ctypes.c_char_p, ctypes.c_int]
    compile_module.restype = ctypes.c_void_p
    for i, case in pickle.loads(cases_file.read_bytes()):
        try:
            core.KNOWN_KERNELS.clear()
            case.export()
            modules = list(core.KNOWN_KERNELS.values())
            if len(modules) != 1:
                raise CompileError(f"lowering gave {len(modules)} Mosaic GPU kernels, not one")
            output = out_dir / f"{i}.out"
            with _dumps_to(output):
                compile_module(modules[0], len(modules[0]))  # fails at loading: the driver is a stand-in
        except Exception as e:  # noqa: BLE001 -- reported per case by the parent
            (out_dir / f"{i}.error").write_text(f"{type(e).__name__}: {e}")


class _dumps_to:
    """Send this process's stdout and stderr (the C++ dumps) to a file, with the dumps on."""

    _DUMPS = ("MOSAIC_GPU_DUMP_PTXAS", "MOSAIC_GPU_DUMP_SASS", "MOSAIC_GPU_DUMP_HOST_LLVM")

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = self.path.open("wb")
        self.saved = os.dup(1), os.dup(2)
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        os.environ.update(dict.fromkeys(self._DUMPS, "1"))

    def __exit__(self, *exc):
        for name in self._DUMPS:
            del os.environ[name]
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.file.close()


# ---------------------------------------------------------------------------------------------
# Tables.

def resources_table(reports: Sequence[KernelReport], loop_names: dict[str, str] | None = None) -> str:
    loop_names = loop_names or {}
    rows = ["| case | grid | threads | registers | budget | spill st/ld B | SMEM B | CTAs/SM regs | CTAs/SM SMEM "
            "| CTAs/SM |" + (" main loop |" if loop_names else ""),
            "|---" * (10 + bool(loop_names)) + "|"]
    for r in reports:
        grid = "x".join(map(str, r.launch.grid))
        loop = f" `{loop_names[r.case.name]}` |" if loop_names else ""
        rows.append(f"| {r.case.name} | {grid} | {r.launch.threads} | {r.registers} | {register_budget(r)} | "
                    f"{r.ptxas.spill_stores}/{r.ptxas.spill_loads} | {r.smem} | {r.ctas_by_registers} | "
                    f"{r.ctas_by_smem} | {r.ctas_per_sm} |{loop}")
    return "\n".join(rows) + "\n"


def loop_table(reports: Sequence[KernelReport]) -> str:
    rows = ["| case | " + " | ".join(CLASS_NAMES) + " | total |", "|---" * (len(CLASS_NAMES) + 2) + "|"]
    for r in reports:
        rows.append(f"| {r.case.name} | " + " | ".join(str(r.loop[n]) for n in CLASS_NAMES) + f" | {r.loop_total} |")
    return "\n".join(rows) + "\n"


def moe_byte_table(reports: Sequence[KernelReport]) -> str:
    shown = ("int", "perm/logic", "half2", "ld.global", "ld.shared", "hgmma", "hmma")
    rows = ["| case | weight B/iteration | " + " | ".join(shown) + " | all | weight B/cycle/SM at issue limit |",
            "|---" * (len(shown) + 4) + "|"]
    for r in reports:
        if r.case.kernel not in ("moe", "moe_mma"):
            continue
        cells = " | ".join(f"{r.per_weight_byte(n):.3f}" for n in shown)
        rows.append(f"| {r.case.name} | {r.case.weight_bytes_per_step()} | {cells} | {r.per_weight_byte():.3f} | "
                    f"{ISSUE_PER_SM / r.per_weight_byte():.1f} |")
    return "\n".join(rows) + "\n"


def tables(reports: Sequence[KernelReport], loop_names: dict[str, str] | None = None) -> str:
    return (
        "Resources (ptxas' registers and spills; SMEM = the launch's dynamic plus ptxas' static bytes):\n\n"
        + resources_table(reports, loop_names)
        + "\nThe main loop's instructions by class (one iteration, one warp):\n\n"
        + loop_table(reports)
        + ("\nThe expert matmul's main loop per packed weight byte (warp instructions x warps / bytes):\n\n"
           + moe_byte_table(reports) if any(r.case.kernel in ("moe", "moe_mma") for r in reports) else "")
    )


def file_stem(case_name: str) -> str:
    """``moe 20b mlp1 tokens=1`` -> ``moe-20b-mlp1-tokens-1``."""
    return re.sub(r"[^a-z0-9]+", "-", case_name.lower()).strip("-")


def main_loop_entries(case_names: Sequence[str], sass: Sequence[str]) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Each case's entry of ``main_loops.json`` and the entries: a main loop's mnemonic counts under
    the first case's name that has them (cases whose loops differ only in operands share one)."""
    names, entries, by_counts = {}, {}, {}
    for case_name, text in zip(case_names, sass, strict=True):
        counts = main_loop_mnemonics(text)
        name = by_counts.setdefault(tuple(counts.items()), file_stem(case_name))
        entries[name] = counts
        names[case_name] = name
    return names, entries


def replace_section(text: str, section: str, title: str = SECTION_TITLE, before: str | None = "## ") -> str:
    """``text`` (RESULTS.md) with the section headed ``title`` (by default this tool's) replaced,
    or added before the first heading starting with ``before`` (by default the first ``## ``;
    None: at the end)."""
    section = section.rstrip("\n") + "\n"
    start = text.find(title + "\n")
    if start < 0:
        found = before is not None and "\n" + before in text
        start = end = text.find("\n" + before) + 1 if found else len(text)
        if start == len(text) and not text.endswith("\n\n"):
            section = "\n" + section
    else:
        following = text.find("\n## ", start + len(title))
        end = following + 1 if following >= 0 else len(text)
    return text[:start] + section + ("\n" if end < len(text) else "") + text[end:]


def shown_path(path: Path) -> Path:
    """``path`` relative to the repository where it lies inside it."""
    return path.relative_to(REPOSITORY) if path.is_relative_to(REPOSITORY) else path


def write_results(reports: Sequence[KernelReport], tools: Tools, results_md: Path = RESULTS_MD,
                  main_loops: Path = MAIN_LOOPS) -> None:
    """Replace this tool's sections of RESULTS.md (the Hopper kernels', the ``mma.sync`` kernel's:
    those of which ``reports`` holds cases) and their entries of ``main_loops``."""
    import jax

    from benchmarks.gpu.e2e import git_commit

    commit = git_commit()
    text = results_md.read_text()
    entries = json.loads(main_loops.read_text()) if main_loops.exists() else {}
    for title, group, mma in ((SECTION_TITLE, [r for r in reports if r.case.kernel != "moe_mma"], False),
                              (MMA_SECTION_TITLE, [r for r in reports if r.case.kernel == "moe_mma"], True)):
        if not group:
            continue
        loop_names, group_entries = main_loop_entries([r.case.name for r in group], [r.sass for r in group])
        entries = {name: counts for name, counts in entries.items() if name.startswith(MMA_LOOP_PREFIX) != mma}
        entries.update(group_entries)
        introduction = MMA_INTRODUCTION if mma else HOPPER_INTRODUCTION.format(target=TARGET)
        section = (
            f"{title}\n\n"
            f"Compiled on the CPU (no GPU) by `python -m benchmarks.kernels.kernel_sass --write`"
            f"{' (or `--only moe-mma --write`)' if mma else ''} {introduction} with "
            f"jax {jax.__version__}, {TOOL_PINS[0]} and {tools.ptxas_version}, at commit {commit}. "
            f"Each main loop's instructions, counted by mnemonic, are in `{shown_path(main_loops)}` "
            "(column main loop; cases whose loops differ only in operands, such as the expert count, share one); "
            "`--sass DIR` writes the whole SASS of each kernel. The tool's docstring says "
            "what each column counts, and the check (`--check`, in CI) what the budget is.\n\n"
            + tables(group, loop_names)
        )
        # The mma.sync kernel's section goes at the end (RESULTS.md's sections are added there).
        text = replace_section(text, section, title, before="## " if not mma else None)
    main_loops.write_text(json.dumps(entries, indent=1) + "\n")
    results_md.write_text(text)


HOPPER_INTRODUCTION = (
    "for `{target}`; each kernel in its default config, the MoE kernel at `tokens` tokens (4 rows each, top-4 "
    "routing). After gpt-oss's own shapes come one device's on each mesh of `benchmarks/kernels/sharded_kernels.py` "
    "(the Multiple GPUs table of `docs/multi-gpu.md`) that one GPU does not have: `E<n>`, n experts per device (a "
    "device gets every token of its data shard); `heads=q/kv`, query / KV heads per device; `batch`, rows per device")
MMA_INTRODUCTION = (
    "for each target the case names (sm_80: A100; sm_89: RTX 4090, L4; sm_120: RTX 5090; the stand-in driver "
    "answering that compute capability), the `mma.sync` expert kernel (`pallas_kernels/mxfp4_moe_mma.py`) in "
    "its default config at gpt-oss-20b's decode shapes, `tokens` tokens (4 rows each, top-4 routing); CTAs/SM "
    "by each target's own limits")


def write_sass(reports: Sequence[KernelReport], directory: Path) -> None:
    """Each kernel's whole SASS, as ``directory/<case>.sass``."""
    directory.mkdir(parents=True, exist_ok=True)
    for r in reports:
        (directory / f"{file_stem(r.case.name)}.sass").write_text(r.sass)


def main(argv: Sequence[str] | None = None) -> list[KernelReport]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels = ["moe", "flash", "decode", "moe-mma"]
    parser.add_argument("--only", nargs="+", choices=kernels, default=kernels,
                        help="these kernels only (moe-mma: the mma.sync expert kernel, for sm_80, sm_89 and sm_120)")
    parser.add_argument("--write", action="store_true",
                        help="write RESULTS.md's sections of the kernels compiled and their entries of "
                             "benchmarks/kernels/main_loops.json")
    parser.add_argument("--sass", type=Path, metavar="DIR", help="write each kernel's whole SASS to DIR")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a kernel spills, draws a ptxas warning or exceeds its register budget")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--tools", type=Path, default=DEFAULT_TOOLS, help="where the tools are installed")
    parser.add_argument("--ptxas", type=Path, help="compile with this ptxas instead of the pinned CUDA 13.0 one")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _compile_in_worker(*args.worker)
        return []
    tools = install_tools(args.tools, args.ptxas)
    hopper = [kernel for kernel in args.only if kernel != "moe-mma"]
    cases = gpt_oss_cases(kernels=hopper) + shard_cases(hopper) + variant_cases(hopper)
    cases += mma_cases() if "moe-mma" in args.only else []
    reports = compile_kernels(cases, tools, jobs=args.jobs)
    targets = sorted({sm_name(case.arch) for case in cases})
    print(f"{tools.ptxas_version}, {', '.join(targets)}\n")
    print(tables(reports))
    refused = [v for r in reports for v in violations(r)]
    print("\n".join(refused) or f"{len(reports)} kernels: no spills, no ptxas warnings, registers within budget")
    if args.write:
        write_results(reports, tools)
    if args.sass:
        write_sass(reports, args.sass)
    if args.check and refused:
        sys.exit(1)
    return reports


if __name__ == "__main__":
    main()
