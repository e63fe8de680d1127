"""On-device parameter bytes of gpt-oss-20b and gpt-oss-120b, from shapes alone.

The model is built abstractly with ``nnx.eval_shape``: nothing is allocated and no weights are
needed, so this runs anywhere. The goals leave room for a KV cache: 20b under
14 GB (a 16 GB card) and 120b under 66 GB (one 80 GB H100). Per-device bytes on 1, 2, 4 and 8
GPUs follow from the partition rules of ``gptoss_jax.sharding`` on the default mesh: each
parameter's shard shape is its shape divided by the mesh axes its PartitionSpec names.

    python -m benchmarks.memory.budget [--json PATH]

``--programs`` goes further: every program a GPU run of ``benchmarks/gpu/gpu_session.py``'s plan runs
(the random-weight initializer's parts, prefill's first and later chunks, the decode loop, the
cache growth) is compiled at the real shapes by XLA's own GPU compiler, deviceless, for an H100
(``--gpu``; :mod:`benchmarks.gpu.gpu_targets`: the CUDA plugin with a stand-in driver, on the CPU),
and its peak taken from the compiler (``compiled.memory_analysis()``): arguments + outputs -
donated (aliased) + temporaries. A run fits a device when its largest program's peak is within
the share of the device's memory that the benchmarks give XLA (``XLA_PYTHON_CLIENT_MEM_FRACTION``,
0.95). How far the figures bind:

* The Pallas kernels are compiled as opaque calls with the kernel's exact operands and outputs
  (``plgpu.kernel`` is replaced while lowering): their Mosaic GPU calls do not compile
  deviceless (XLA's GPU compiler JITs each kernel's host-side launcher, whose symbols the
  stand-in driver does not provide: "Failed to lookup host symbol ... kernel_mosaic_gpu"). A
  kernel holds nothing else in device memory (its tiles live in shared memory and registers),
  so for the kernel path the figure is exact up to what follows, and holds for any kernel of
  the same operands (the ``mma.sync`` expert kernel's too).
* Left out, on a GPU: the CUDA context and cuBLAS workspaces (under 1 GB), within the 5% the
  memory fraction leaves.
* ``--cpu`` compiles on the CPU instead, as this module did before the deviceless GPU compile:
  the CPU compiler makes float32 copies of bfloat16 matmul weights (the unembedding's upcast
  and transpose, 4.6 GB for both models; in the decode loop every layer's attention weights),
  so its figures are upper bounds, by up to 7 (20b) or 8.4 GB (120b).
* ``--per-device`` (meshes of 1 to 8 devices) still compiles on the CPU: meshes of several
  compile-only GPUs are not tried yet, so its figures are the CPU's upper bounds.

``--fit`` says which batch x context fit beside a model on one GPU, on both paths (kernels and
XLA), compiled for that GPU; a prefill chunk that does not fit is halved until it does.

    python -m benchmarks.memory.budget --programs [--gpu NAME] [--json PATH]
    python -m benchmarks.memory.budget --fit gpt-oss-20b --gpu "RTX 4060 Ti 16 GB"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.gpu import gpu_targets
from benchmarks.gpu.e2e import default_prefill_chunk_size
from benchmarks.gpu.gpu_session import GenerateCase, session_steps
from gptoss_jax import footprint
from gptoss_jax.checkpoints.parameters import abstract_model
from gptoss_jax.config import GptOssConfig, preset
from gptoss_jax.generate import lower_generate
from gptoss_jax.kv_cache import cache_bytes
from gptoss_jax.opening import GPU_MEMORY_FRACTION
from gptoss_jax.random_weights import PART_KINDS, part_initializer
from gptoss_jax.sharding import AXES, default_mesh_shape, make_mesh

DEVICE_COUNTS = (1, 2, 4, 8)

GOALS_GB = {"gpt-oss-20b": 14.0, "gpt-oss-120b": 66.0}

# The GPUs the programs table is held against (their memory as sold, in bytes). Both are sm_90:
# one compile, for the first, serves both.
DEVICES = {name: gpu_targets.gpu_target(name).memory_bytes for name in ("H100 80 GB", "H200 141 GB")}


def parameter_bytes(name: str) -> dict[str, int]:
    """Bytes of each kind of parameter of a preset: MXFP4 experts, expert biases, the rest."""
    return footprint.parameter_bytes(preset(name))


def per_device_bytes(name: str, mesh_shape: dict[str, int]) -> int:
    """Parameter bytes one device holds on a mesh of these axis sizes (the largest shard, if uneven)."""
    return footprint.per_device_parameter_bytes(preset(name), mesh_shape)


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """A compiled program's device bytes, from ``compiled.memory_analysis()``."""

    program: str
    cache_length: int | None  # positions of the KV cache it holds, if any
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written over donated arguments
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Everything the program holds at once: its arguments, new outputs and temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @classmethod
    def of(cls, program: str, compiled: jax.stages.Compiled, cache_length: int | None = None) -> ProgramMemory:
        stats = compiled.memory_analysis()
        return cls(program, cache_length, stats.argument_size_in_bytes, stats.output_size_in_bytes,
                   stats.alias_size_in_bytes, stats.temp_size_in_bytes)


def _opaque_kernel(body=None, *, out_type, **options):
    """``plgpu.kernel`` as an opaque call with the kernel's operands and outputs: its outputs made
    behind an optimization barrier with its operands, so every operand is live until the outputs
    exist and nothing of the call can be fused with or moved past. Compiles for any backend (a
    host callback does not compile for a GPU without one, nor do the Mosaic calls themselves)."""
    if body is None:  # used as a decorator
        return lambda body: _opaque_kernel(body, out_type=out_type, **options)

    def call(*operands: jax.Array):
        outputs = jax.tree.map(lambda out: jnp.zeros(out.shape, out.dtype), out_type)
        return jax.lax.optimization_barrier((operands, outputs))[1]

    return call


@contextlib.contextmanager
def kernels_as_opaque_calls() -> Iterator[None]:
    """While open, the Pallas kernels lower to opaque calls of their exact operands and outputs.

    The kernels' wrappers are jitted, and jit keeps their traces by argument shapes: JAX's caches
    are cleared on the way in and out, so no trace made under the stand-in outlives it (a later
    trace of the same shapes would otherwise get the opaque call, not the kernel)."""
    jax.clear_caches()
    try:
        with mock.patch.object(plgpu, "kernel", _opaque_kernel):
            yield
    finally:
        jax.clear_caches()


def _compiling_for(device: jax.Device | None) -> contextlib.AbstractContextManager:
    """Where programs lowered inside compile: ``device`` (a compile-only GPU), or the CPU."""
    return contextlib.nullcontext() if device is None else jax.default_device(device)


@functools.cache
def initializer_memory(config: GptOssConfig, device: jax.Device | None = None) -> tuple[ProgramMemory, ...]:
    """Each kind of part of ``random_weights.random_model``, as the last part drawn: all others exist.

    Its arguments are counted as every parameter outside the part, so its peak is the whole
    model's parameters plus the part's temporaries. Compiled once per configuration and device:
    the plan's steps share a model's.
    """
    total = sum(footprint.parameter_bytes(config).values())
    key = jax.eval_shape(lambda: jax.random.key(0))
    rows = []
    for kind in PART_KINDS:
        with _compiling_for(device):
            compiled = part_initializer(config, kind).lower(key).compile()
        stats = compiled.memory_analysis()
        rows.append(ProgramMemory(f"initializer: {kind}", None, total - stats.output_size_in_bytes,
                                  stats.output_size_in_bytes, 0, stats.temp_size_in_bytes))
    return tuple(rows)


def generate_memory(config: GptOssConfig, case: GenerateCase, mesh: jax.sharding.Mesh | None = None,
                    only: Collection[str] | None = None, device: jax.Device | None = None) -> list[ProgramMemory]:
    """Every program ``generate`` runs for ``case`` (or those named in ``only``), compiled for
    ``device`` (a compile-only GPU of :mod:`benchmarks.gpu.gpu_targets`) or on the CPU, kernels as
    opaque calls. On a mesh (CPU only), the figures are one device's.
    """
    with kernels_as_opaque_calls(), _compiling_for(device):
        model = abstract_model(config, kernels=case.kernels, mesh=mesh)
        programs = lower_generate(model, case.batch, case.prompt_len, case.new_tokens,
                                  prefill_chunk_size=case.prefill_chunk_size)
        return [ProgramMemory.of(name, program.lowered.compile(), program.cache_length)
                for name, program in programs.items() if only is None or name in only]


def case_report(case: GenerateCase, *, layers: int | None = None, device: jax.Device | None = None) -> dict:
    """The programs of one case and whether it fits each of :data:`DEVICES` (JSON-ready).

    ``layers``: build the model at this depth instead of the preset's (tests). ``device``: a
    compile-only GPU to compile for (:mod:`benchmarks.gpu.gpu_targets`); None: the CPU.
    """
    config = preset(case.model)
    if layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=layers)
    start = time.perf_counter()
    programs = [*initializer_memory(config, device), *generate_memory(config, case, device=device)]
    peak = max(program.peak_bytes for program in programs)
    return {
        "case": dataclasses.asdict(case),
        "name": case.name,
        "compiler": "CPU" if device is None else device.device_kind,
        "layers": config.num_hidden_layers,
        "parameter_bytes": sum(footprint.parameter_bytes(config).values()),
        "programs": [{**dataclasses.asdict(p), "peak_bytes": p.peak_bytes,
                      "cache_bytes": None if p.cache_length is None else cache_bytes(config, case.batch, p.cache_length)}
                     for p in programs],
        "peak_bytes": peak,
        "fits": {device: _fits(peak, size) for device, size in DEVICES.items()},
        "compile_seconds": time.perf_counter() - start,
    }


def _fits(peak_bytes: float, device_bytes: float) -> bool:
    """Whether a peak is within the share of a device's memory XLA is given."""
    return peak_bytes <= GPU_MEMORY_FRACTION * device_bytes


def format_case(report: dict) -> str:
    """The Markdown rows of :func:`case_report`'s programs."""
    gb = lambda value: "-" if value is None else f"{value / 1e9:.2f}"  # noqa: E731
    lines = []
    for program in report["programs"]:
        fits = " | ".join("yes" if _fits(program["peak_bytes"], size) else "**no**" for size in DEVICES.values())
        context = "-" if program["cache_length"] is None else str(program["cache_length"])
        lines.append(f"| {program['program']} | {report['case']['model']} | {report['case']['kernels']} | "
                     f"{report['case']['batch']} | {context} | {gb(report['parameter_bytes'])} | "
                     f"{gb(program['cache_bytes'])} | {gb(program['temp_bytes'])} | {gb(program['peak_bytes'])} | "
                     f"{fits} |")
    return "\n".join(lines)


PROGRAMS_HEADER = ("| program | model | kernels | batch | context | parameters GB | cache GB | temporaries GB | "
                   "peak GB | " + " | ".join(f"fits {device}" for device in DEVICES) + " |\n"
                   "|---|---|---|---|---|---|---|---|---|" + "---|" * len(DEVICES))


def plan_cases() -> list[tuple[str, GenerateCase]]:
    """``(gpu_session step, case)`` of every step of the device session that generates."""
    return [(step.name, step.memory_case) for step in session_steps(Path("out"), None) if step.memory_case]


def programs_main(cases: Sequence[tuple[str, GenerateCase]], json_path: str | None,
                  device: jax.Device | None) -> dict:
    """Compile every case's programs, print the table, write the JSON (after each case)."""
    reports = {}
    print(PROGRAMS_HEADER, flush=True)
    for step, case in cases:
        reports[step] = case_report(case, device=device)
        print(format_case(reports[step]), flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps(reports, indent=2))
    for step, report in reports.items():
        verdict = ", ".join(f"{device} {'fits' if fits else 'DOES NOT FIT'}" for device, fits in report["fits"].items())
        print(f"{step}: {report['name']}: peak {report['peak_bytes'] / 1e9:.2f} GB ({verdict}; "
              f"compiled in {report['compile_seconds']:.0f} s)")
    return reports


FIT_BATCHES = (1, 4, 16, 64)
FIT_CONTEXTS = (8192, 32768, 131072)
FIT_PATHS = ("pallas", "xla")
_FIT_NEW_TOKENS = 256
_SMALLEST_FIT_CHUNK = 64


def fit_table(model: str, device_bytes: float, device: jax.Device, batches: Sequence[int] = FIT_BATCHES,
              contexts: Sequence[int] = FIT_CONTEXTS, paths: Sequence[str] = FIT_PATHS) -> list[dict]:
    """Whether generating at each path x batch x context fits beside ``model``'s parameters on one GPU.

    A point is compiled for ``device`` (a compile-only GPU) unless its parameters and cache alone
    are over the limit: the decode loop, and prefill's later chunk (``generate``'s largest
    programs) at a cache of ``context`` positions. A prefill chunk that does not fit is halved
    (down to 64 tokens a row): the row gives the largest that fits. ``pallas``'s kernels are
    opaque calls of their exact operands (:func:`kernels_as_opaque_calls`), so its row holds for
    any kernel of those operands.
    """
    config = preset(model)
    limit = GPU_MEMORY_FRACTION * device_bytes
    parameters = sum(footprint.parameter_bytes(config).values())
    rows = []
    for path in paths:
        for batch in batches:
            for context in contexts:
                row = {"kernels": path, "batch": batch, "context": context,
                       "cache_bytes": cache_bytes(config, batch, context), "prefill_chunk": None,
                       "prefill_peak_bytes": None, "decode_peak_bytes": None}
                if parameters + row["cache_bytes"] <= limit:
                    row.update(_fitting_programs(config, GenerateCase(
                        model, path, batch, context - _FIT_NEW_TOKENS, _FIT_NEW_TOKENS,
                        default_prefill_chunk_size(batch)), limit, device))
                row["fits"] = row["decode_peak_bytes"] is not None and max(
                    row["decode_peak_bytes"], row["prefill_peak_bytes"]) <= limit
                rows.append(row)
                print(format_fit_row(row, parameters, limit), flush=True)
    return rows


def _fitting_programs(config: GptOssConfig, case: GenerateCase, limit: float, device: jax.Device) -> dict:
    """The decode loop's peak, and prefill's at the largest chunk within ``limit`` (or the smallest)."""
    programs = {program.program: program for program in
                generate_memory(config, case, only=("decode", "prefill (later chunk)"), device=device)}
    decode, prefill = programs["decode"], programs["prefill (later chunk)"]
    while prefill.peak_bytes > limit and case.prefill_chunk_size > _SMALLEST_FIT_CHUNK:
        case = dataclasses.replace(case, prefill_chunk_size=case.prefill_chunk_size // 2)
        prefill = generate_memory(config, case, only=("prefill (later chunk)",), device=device)[0]
    return {"prefill_chunk": case.prefill_chunk_size, "prefill_peak_bytes": prefill.peak_bytes,
            "decode_peak_bytes": decode.peak_bytes}


FIT_HEADER = ("| kernels | batch | context | parameters GB | cache GB | decode peak GB | prefill chunk | "
              "prefill peak GB | fits |\n|---|---|---|---|---|---|---|---|---|")


def format_fit_row(row: dict, parameter_bytes_total: int, limit: float) -> str:
    gb = lambda value: "-" if value is None else f"{value / 1e9:.2f}"  # noqa: E731
    if row["decode_peak_bytes"] is None:
        verdict = f"no: parameters + cache alone are over {limit / 1e9:.1f} GB"
    else:
        verdict = "yes" if row["fits"] else "no"
    return (f"| {row['kernels']} | {row['batch']} | {row['context'] // 1024}K | {gb(parameter_bytes_total)} | "
            f"{gb(row['cache_bytes'])} | {gb(row['decode_peak_bytes'])} | {row['prefill_chunk'] or '-'} | "
            f"{gb(row['prefill_peak_bytes'])} | {verdict} |")


def _mesh_name(shape: dict[str, int]) -> str:
    return ",".join(f"{axis}={shape[axis]}" for axis in AXES)


PER_DEVICE_CASE = GenerateCase("gpt-oss-120b", "pallas", 1, 20000, 256)  # e2e-120b-32k's: a 32K cache


def per_device_table(case: GenerateCase = PER_DEVICE_CASE, device_counts: Sequence[int] = DEVICE_COUNTS) -> list[dict]:
    """One device's parameters, cache and peak for ``case`` on the default mesh of each device count.

    Needs ``max(device_counts)`` devices (on the CPU, ``--xla_force_host_platform_device_count``).
    """
    config = preset(case.model)
    rows = []
    for count in device_counts:
        shape = default_mesh_shape(count, config)
        mesh = make_mesh(shape, jax.devices()[:count]) if count > 1 else None
        programs = generate_memory(config, case, mesh)
        largest = max(programs, key=lambda program: program.peak_bytes)
        rows.append({
            "devices": count, "mesh": _mesh_name(shape),
            "parameter_bytes": per_device_bytes(case.model, shape),
            "cache_bytes": cache_bytes(config, case.batch, largest.cache_length, mesh=mesh),
            "cache_length": largest.cache_length, "program": largest.program,
            "temp_bytes": largest.temp_bytes, "peak_bytes": largest.peak_bytes,
        })
        row = rows[-1]
        print(f"| {count} | {row['mesh']} | {row['parameter_bytes'] / 1e9:.2f} | {row['cache_bytes'] / 1e9:.2f} | "
              f"{row['program']} | {row['temp_bytes'] / 1e9:.2f} | {row['peak_bytes'] / 1e9:.2f} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpus = [target.name for target in gpu_targets.GPU_TARGETS]
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--programs", action="store_true",
                        help="compile the programs of every generating step of benchmarks/gpu/gpu_session.py for --gpu "
                             "and print their peak memory against the GPUs' (minutes)")
    parser.add_argument("--step", nargs="+", metavar="STEP", help="with --programs: only these gpu_session steps")
    parser.add_argument("--fit", choices=["gpt-oss-20b", "gpt-oss-120b"],
                        help="which batch x context fit beside this model on one --gpu, on the kernel path and on "
                             "XLA's (compiles; minutes)")
    parser.add_argument("--gpu", choices=gpus, default="H100 80 GB",
                        help="with --programs or --fit: the GPU XLA's compiler targets, deviceless (default: "
                             "%(default)s); its memory as sold is --fit's device size")
    parser.add_argument("--device-gb", type=float, help="with --fit: the device's memory in GB, instead of --gpu's")
    parser.add_argument("--batch", type=int, nargs="+", default=FIT_BATCHES, help="with --fit: the batches "
                        f"(default: {' '.join(map(str, FIT_BATCHES))})")
    parser.add_argument("--context", type=int, nargs="+", default=FIT_CONTEXTS, help="with --fit: the contexts "
                        f"(default: {' '.join(map(str, FIT_CONTEXTS))})")
    parser.add_argument("--cpu", action="store_true",
                        help="with --programs: compile on the CPU instead (upper bounds: see above)")
    parser.add_argument("--per-device", action="store_true",
                        help=f"one device's memory for {PER_DEVICE_CASE.name} on the default mesh of "
                             f"{', '.join(map(str, DEVICE_COUNTS))} GPUs (compiles on the CPU; minutes)")
    args = parser.parse_args()
    if args.per_device:
        if jax.device_count() < max(DEVICE_COUNTS):
            # The CPU's device count is fixed when JAX starts: start again with enough.
            flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={max(DEVICE_COUNTS)}"
            os.execve(sys.executable, [sys.executable, "-m", "benchmarks.memory.budget", *sys.argv[1:]],
                      {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"})
        print(f"{PER_DEVICE_CASE.name}, one device's share:\n| GPUs | mesh | parameters GB | cache GB | "
              "largest program | its temporaries GB | its peak GB |\n|---|---|---|---|---|---|---|", flush=True)
        rows = per_device_table()
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    if args.fit or (args.programs and not args.cpu):
        gpu_targets.restart_deviceless("benchmarks.memory.budget")
        target = gpu_targets.gpu_target(args.gpu)
        device = gpu_targets.compile_only_device(target)
    if args.fit:
        device_bytes = target.memory_bytes if args.device_gb is None else args.device_gb * 1e9
        print(f"{args.fit} on one {device_bytes / 1e9:g} GB GPU (XLA may take {GPU_MEMORY_FRACTION:.0%}), compiled "
              f"for an {target.name} ({target.sm_version}), {_FIT_NEW_TOKENS} tokens generated after context - "
              f"{_FIT_NEW_TOKENS}:\n{FIT_HEADER}", flush=True)
        rows = fit_table(args.fit, device_bytes, device, args.batch, args.context)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    if args.programs:
        cases = [(step, case) for step, case in plan_cases() if not args.step or step in args.step]
        programs_main(cases, args.json, None if args.cpu else device)
        return
    report = {}
    for name, goal in GOALS_GB.items():
        parts = parameter_bytes(name)
        total = sum(parts.values())
        report[name] = {"parts": parts, "total_bytes": total, "goal_gb": goal}
        print(f"{name}: {total / 1e9:.2f} GB of parameters on device (goal < {goal:g} GB: "
              f"{'met' if total / 1e9 < goal else 'MISSED'})")
        for part, size in parts.items():
            print(f"  {part:34s} {size / 1e9:7.2f} GB")
        report[name]["per_device_bytes"] = {}
        for count in DEVICE_COUNTS:
            shape = default_mesh_shape(count, preset(name))
            per_device = per_device_bytes(name, shape)
            report[name]["per_device_bytes"][count] = per_device
            mesh = _mesh_name(shape)
            print(f"  on {count} GPU{'s' if count > 1 else ' '} ({mesh}): {per_device / 1e9:7.2f} GB per device")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
