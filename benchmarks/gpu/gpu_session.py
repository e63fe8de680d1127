"""Every GPU check of a device session in one command, most important first, within a budget.

A session lent a GPU has 15 minutes of device time in all, the machine's start included, and at
most 10 minutes a command. So the checks run as one prepared command that stops in time, not
as a list of commands typed one by one; from the repository root on the device machine::

    PYTHONPATH=. python3 -m benchmarks.gpu.gpu_session --out $OUT --commit <HASH>

(the device's copy of the tree has no .git: pass the commit from this side). The steps, in
order (``--list`` prints their commands):

* ``env``: the GPU, its driver and CUDA, jax's devices and versions;
* ``gptoss-env``: ``gptoss-jax env``, what the project sees there (which kernels run, and why);
* ``kernel-check``: the first-use kernel check a user's first run makes (``benchmarks.gpu.kernel_check``:
  each kernel once at gpt-oss-20b's shapes against its XLA reference, in a child process under a
  time limit), its verdicts appended to ``OUT/RESULTS.md``;
* ``kernel-tests``: ``pytest -k gpu`` on the kernel test files: the kernels compiled for the GPU
  against their references, every test under a time limit of its own (a kernel that waits on a
  barrier forever hangs the GPU rather than fail);
* ``moe-kernel``, ``attention-kernel``: the kernel benchmarks against the XLA paths and the
  device's peaks;
* ``structured``: one JSON-constrained row beside 15 free ones on the demo model
  (``benchmarks.throughput.structured``): the decode loop's host callback on CUDA, and its cost.
  It needs llguidance, which the device's image lacks: carry its wheel (the device tool's
  README says how; ``cp39-abi3-manylinux_2_31_x86_64``, 8 MB), else the step fails saying so;
* ``moe-mma``: the ``mma.sync`` expert kernel (Ampere's, Ada's and Blackwell's, which runs on
  Hopper too) at gpt-oss-20b's decode sizes, as Hopper and as an sm_80 device lower it, timed
  beside the WGMMA kernel and checked against the reference (its compiled tests run in
  ``kernel-tests``);
* ``e2e-20b``: gpt-oss-20b end to end (``--quick``, profiled: where decode time goes);
* ``e2e-120b``: gpt-oss-120b end to end (``--quick``);
* ``e2e-120b-32k``: gpt-oss-120b with a 20000-token prompt, so a 32K-token cache: its peak
  memory says whether 120b decodes with a 32K cache within an H100's 80 GB;
* ``e2e-20b-xla``: gpt-oss-20b on the XLA path, the end-to-end baseline;
* ``moe-sweep``: the expert kernel's tuning configs at decode and prefill sizes;
* ``engine-20b``: the continuous-batching engine at gpt-oss-20b shapes, 64 concurrent 1K/1K
  requests, against static batching;
* ``serve-20b``: the HTTP server under 64 concurrent streaming clients at gpt-oss-20b shapes;
* ``engine-traffic-20b``: the engine's real-traffic workloads (``benchmarks.throughput.engine --traffic``:
  short requests together, users sharing a system prompt, an agent replay) with the prefix cache
  on, off and one request at a time.

The generating steps (``e2e-*``) are checked against the GPU's memory first: at the start,
``benchmarks.memory.budget --programs`` compiles their programs at the real shapes on the CPU, beside
the steps before them, and a step whose peak is over 95% of the GPU's memory is left out, with
the program and the figures, rather than run into an out-of-memory error (its log goes into the
session log; the engine and server steps at gpt-oss-20b, 17 GB in all, size themselves).

Each step runs in a process group of its own under ``min(its limit, what is left of --budget)``
seconds; the group is killed when the step ends or that time runs out, so nothing it started
keeps the GPU from the next step. A step is skipped when less than a minute of the budget is
left. The output goes to stdout and ``OUT/session.log``, the e2e steps' JSON and Markdown rows
to ``OUT``, and the summary (each step's status and seconds, and the command that runs the
steps left over) to stdout and ``OUT/summary.md``. The default budget (520 s) leaves about five
of the session's 15 minutes, after the machine's start, for a second call (``--from STEP``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from gptoss_jax.opening import GPU_MEMORY_FRACTION

REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_SECONDS = 520
MIN_STEP_SECONDS = 60
TEST_TIMEOUT_SECONDS = 150  # one test, its compiles included
KERNEL_TEST_FILES = (
    "tests/test_mxfp4_moe_kernel.py", "tests/test_mxfp4_moe_mma_kernel.py", "tests/test_attention_kernels.py", "tests/test_kernel_dispatch.py",
    "tests/test_gpu_measure.py",
)
# The scratch folder of the profiled run: its trace files lie too deep for the device's $OUT.
TRACE_DIR = "/tmp/gpu-session-trace"
# The memory check's JSON and log: $OUT brings back 8 files, all taken (see session_steps).
MEMORY_CHECK_DIR = Path("/tmp/gpu-session-memory")


def print_environment() -> None:
    """``nvidia-smi``, jax's version and devices, the device's compute capability, CUDA's versions."""
    import jax
    from jax._src.lib import cuda_versions  # None without a CUDA plugin

    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi"], check=False)
    device = jax.devices()[0]
    print(f"jax {jax.__version__}; devices {jax.devices()}")
    print(f"{device.device_kind}, compute capability {getattr(device, 'compute_capability', None)}")
    if cuda_versions is not None:
        print(f"CUDA runtime {cuda_versions.cuda_runtime_get_version()}, "
              f"driver {cuda_versions.cuda_driver_get_version()}")


@dataclasses.dataclass(frozen=True)
class GenerateCase:
    """One ``benchmarks.gpu.e2e`` run: a model generating ``new_tokens`` after ``prompt_len`` for ``batch`` rows."""

    model: str
    kernels: str  # "pallas" or "xla"
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_chunk_size: int = 512

    @property
    def name(self) -> str:
        return f"{self.model} {self.kernels} batch {self.batch}, {self.prompt_len}+{self.new_tokens} tokens"

    def e2e_arguments(self) -> tuple[str, ...]:
        return ("--model", self.model, "--kernels", self.kernels, "--batch", str(self.batch),
                "--prompt-len", str(self.prompt_len), "--new-tokens", str(self.new_tokens),
                "--prefill-chunk-size", str(self.prefill_chunk_size))


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    command: tuple[str, ...]
    limit_seconds: float
    env: tuple[tuple[str, str], ...] = ()  # set for its command
    memory_case: GenerateCase | None = None  # run only if its programs fit the GPU's memory


@dataclasses.dataclass
class Outcome:
    step: str
    status: str  # "passed", "failed (exit N)", "timed out after N s", "skipped: ...", "left out: ..."
    seconds: float = 0.0

    @property
    def left_over(self) -> bool:
        """Skipped for want of budget, so for another call (a step left out for memory is not)."""
        return self.status.startswith("skipped")


def session_steps(out: Path, commit: str | None) -> list[Step]:
    """The device session's steps, most important first; ``commit`` for the e2e rows (None: git's)."""
    python = sys.executable
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu", *KERNEL_TEST_FILES]
    if importlib.util.find_spec("pytest_timeout") is not None:
        # The thread method: a test blocked in a wait on the GPU never returns to Python for a signal.
        pytest += [f"--timeout={TEST_TIMEOUT_SECONDS}", "--timeout-method=thread"]
    if importlib.util.find_spec("xdist") is not None:
        pytest += ["-n", "4"]  # the Mosaic GPU lowering is CPU-bound; the tests share the GPU

    # The device brings back at most 8 files from OUT: the log, the summary, the e2e rows and
    # the e2e steps' JSON files make 7.
    def e2e(name: str, case: GenerateCase, limit_seconds: float, *extra: str) -> Step:
        command = (python, "-m", "benchmarks.gpu.e2e", *case.e2e_arguments(), *(("--commit", commit) if commit else ()),
                   "--results-md", str(out / "RESULTS.md"), "--json", str(out / f"{name}.json"), *extra)
        return Step(name, command, limit_seconds, memory_case=case)

    return [
        Step("env", (python, "-c", "import benchmarks.gpu.gpu_session as s; s.print_environment()"), 60),
        # What a user's `gptoss-jax env` says on this GPU (for RESULTS.md).
        Step("gptoss-env", (python, "-m", "gptoss_jax.cli", "env"), 60),
        # What a user's first run checks, first among the kernel steps: a kernel that fails here
        # explains the failures of every later step.
        Step("kernel-check", (python, "-m", "benchmarks.gpu.kernel_check", "--results-md", str(out / "RESULTS.md"),
                              *(("--commit", commit) if commit else ())), 240),
        # Several test workers share the GPU: none may take most of its memory up front.
        Step("kernel-tests", tuple(pytest), 300, env=(("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),)),
        Step("moe-kernel", (python, "-m", "benchmarks.gpu.moe_kernel"), 240),
        Step("moe-mma", (python, "-m", "benchmarks.gpu.moe_kernel", "--mma", "--models", "20b", "--tokens", "1", "8",
                         "64"), 150),
        Step("attention-kernel", (python, "-m", "benchmarks.gpu.attention_kernel"), 180),
        # A JSON-constrained row is steered by a host callback inside the decode loop: does that
        # run on CUDA, and what does it cost the 15 rows beside it there (the demo model)?
        Step("structured", (python, "-m", "benchmarks.throughput.structured", "--tokens", "64", "--runs", "3",
                            "--repeats", "0"), 150),
        # One batch size each, as e2e's --quick: every batch size compiles again.
        e2e("e2e-20b", GenerateCase("gpt-oss-20b", "pallas", 1, 1024, 256), 300, "--profile", TRACE_DIR),
        e2e("e2e-120b", GenerateCase("gpt-oss-120b", "pallas", 1, 1024, 256), 300),
        # 20000 + 256 tokens round up to a 32K-token cache: does 120b fit 80 GB with one?
        e2e("e2e-120b-32k", GenerateCase("gpt-oss-120b", "pallas", 1, 20000, 256), 420),
        e2e("e2e-20b-xla", GenerateCase("gpt-oss-20b", "xla", 1, 1024, 256), 300),
        Step("moe-sweep", (python, "-m", "benchmarks.gpu.moe_kernel", "--sweep", "--models", "20b",
                           "--tokens", "1", "64", "4096"), 300),
        # The engine's goal: 64 concurrent 1K/1K requests at gpt-oss-20b shapes, against static batching.
        Step("engine-20b", (python, "-m", "benchmarks.throughput.engine", "--model", "gpt-oss-20b", "--requests", "64",
                            "--prompt-len", "1024", "1024", "--new-tokens", "1024", "1024", "--baselines", "static",
                            "--burst-steps", "32", "--json", str(out / "engine-20b.json")), 420),
        Step("serve-20b", (python, "-m", "benchmarks.throughput.serve", "--model", "gpt-oss-20b", "--clients", "64",
                           "--prompt-len", "1024", "1024", "--new-tokens", "256", "256", "--skip-sequential"), 300),
        # Real traffic (batched prefill, the prefix cache), cache on / off / one at a time, figures in the log
        # (OUT's 8 files are taken): workload b at full length is the agent replay, a and c are quicker.
        Step("engine-traffic-20b", (python, "-m", "benchmarks.throughput.engine", "--model", "gpt-oss-20b", "--traffic", "a", "c",
                                    "b", "--prefill-budget", "8192", "--burst-steps", "32"), 420),
    ]


def _echo(text: str, log: TextIO) -> None:
    """Write ``text`` to stdout and the session log."""
    for stream in (sys.stdout, log):
        stream.write(text)
        stream.flush()


def _run_command(command: Sequence[str], env: dict[str, str], seconds: float, log: TextIO) -> int | None:
    """Run ``command`` in a process group of its own, its output to stdout and ``log``.

    Returns its exit status, or None when it ran past ``seconds`` and the group was killed.
    """
    _echo(f"$ {shlex.join(command)}\n", log)
    try:
        # A process group, not a session: whatever ends this command's session (the device
        # tool's limit) ends the step with it instead of leaving it on the GPU.
        process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", process_group=0)
    except OSError as error:  # not installed
        _echo(f"cannot run {command[0]}: {error}\n", log)
        return 127

    def copy_output() -> None:
        for line in process.stdout:
            _echo(line, log)

    copier = threading.Thread(target=copy_output, daemon=True)
    copier.start()
    try:
        status = process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        status = None
    finally:
        # Whatever the group still holds (all of it past the limit or on Ctrl-C, a worker the
        # step left behind otherwise) would keep the GPU from the next step.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    copier.join(timeout=5)
    return status


def gpu_memory_bytes() -> int | None:
    """The first GPU's memory as ``nvidia-smi`` reports it; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                            capture_output=True, text=True, check=False)
    try:
        return int(result.stdout.split()[0]) << 20  # MiB
    except (IndexError, ValueError):
        return None


def memory_check_command(step_names: Sequence[str], json_path: Path) -> tuple[str, ...]:
    """The command that writes the steps' program memory to ``json_path`` (``benchmarks.memory.budget --programs``).

    Compiled on the CPU (``--cpu``, upper bounds): the deviceless GPU compile needs tools from
    PyPI, which the device machine cannot reach, and the GPU itself is busy with the other steps.
    """
    return (sys.executable, "-m", "benchmarks.memory.budget", "--programs", "--cpu", "--json", str(json_path),
            "--step", *step_names)


class MemoryCheck:
    """``benchmarks.memory.budget --programs`` for the steps that generate, on the CPU, beside the GPU steps.

    It compiles each step's programs at the real shapes (minutes of CPU, none of the GPU's), so
    a step whose peak is over the GPU's memory is skipped rather than run into an out-of-memory
    error. The steps before the first generating one (the kernel tests and benchmarks) run
    meanwhile.
    """

    def __init__(self, steps: Sequence[Step], environment: dict[str, str], folder: Path = MEMORY_CHECK_DIR):
        folder.mkdir(parents=True, exist_ok=True)
        self.json_path = folder / "memory.json"
        self.json_path.unlink(missing_ok=True)
        self.log_path = folder / "memory.log"
        command = memory_check_command([step.name for step in steps if step.memory_case is not None], self.json_path)
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(command, cwd=REPOSITORY, env={**environment, "JAX_PLATFORMS": "cpu"},
                                            stdout=log, stderr=subprocess.STDOUT, process_group=0)
        self._reported = False

    def skip_reason(self, step: Step, device_bytes: int | None, wait_seconds: float, log: TextIO) -> str | None:
        """Why ``step`` cannot fit the GPU, or None to run it (also when nothing could be checked)."""
        try:
            self.process.wait(timeout=max(wait_seconds, 0))
        except subprocess.TimeoutExpired:
            _echo(f"memory check: not done within {wait_seconds:.0f} s; {step.name} runs unchecked\n", log)
            return None
        if not self._reported:
            self._reported = True
            _echo(f"\n===== memory check (exit {self.process.returncode}) =====\n{self.log_path.read_text()}\n", log)
        reports = json.loads(self.json_path.read_text()) if self.json_path.exists() else {}
        report = reports.get(step.name)
        if report is None or device_bytes is None:
            _echo(f"memory check: no {'figure' if report is None else 'GPU memory'} for {step.name}; "
                  "it runs unchecked\n", log)
            return None
        limit = GPU_MEMORY_FRACTION * device_bytes  # what the benchmarks give XLA
        if report["peak_bytes"] <= limit:
            return None
        largest = max(report["programs"], key=lambda program: program["peak_bytes"])
        return (f"left out: its {largest['program']} needs {largest['peak_bytes'] / 1e9:.1f} GB, over the "
                f"{limit / 1e9:.1f} GB XLA may take of this GPU's {device_bytes / 1e9:.1f} GB")

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def run_session(steps: Sequence[Step], out: Path, budget_seconds: float,
                memory_check_dir: Path = MEMORY_CHECK_DIR) -> list[Outcome]:
    """Run ``steps`` in order within ``budget_seconds``; a failed step does not stop the others.

    A step with a ``memory_case`` waits for the memory check (:class:`MemoryCheck`) and is
    skipped, with the reason, when its programs do not fit the GPU.
    """
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_seconds
    pythonpath = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
    outcomes = []
    memory_check = (MemoryCheck(steps, environment, memory_check_dir)
                    if any(step.memory_case is not None for step in steps) else None)
    device_bytes = gpu_memory_bytes()
    with (out / "session.log").open("a") as log, contextlib.ExitStack() as cleanup:
        if memory_check is not None:
            cleanup.callback(memory_check.close)
        for step in steps:
            left = deadline - time.monotonic()
            if left >= MIN_STEP_SECONDS and step.memory_case is not None:  # so memory_check exists
                reason = memory_check.skip_reason(step, device_bytes, left - MIN_STEP_SECONDS, log)
                if reason is not None:
                    _echo(f"\n===== {step.name}: {reason} =====\n", log)
                    outcomes.append(Outcome(step.name, reason))
                    continue
                left = deadline - time.monotonic()
            if left < MIN_STEP_SECONDS:
                outcomes.append(Outcome(step.name, f"skipped: {max(left, 0):.0f} s of the budget left"))
                continue
            limit = min(step.limit_seconds, left)
            _echo(f"\n===== {step.name} (limit {limit:.0f} s) =====\n", log)
            start = time.monotonic()
            status = _run_command(step.command, {**environment, **dict(step.env)}, limit, log)
            if status == 0:
                text = "passed"
            elif status is None:
                text = f"timed out after {limit:.0f} s"
            else:
                text = f"failed (exit {status})"
            outcomes.append(Outcome(step.name, text, time.monotonic() - start))
    return outcomes


def summary(outcomes: Sequence[Outcome], rerun: str) -> str:
    """A Markdown table of the outcomes, and ``rerun --from STEP`` for the steps left over."""
    lines = ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {o.step} | {o.status} | {o.seconds:.0f} |" for o in outcomes]
    skipped = [o.step for o in outcomes if o.left_over]
    if skipped:
        lines += ["", f"left for another call: {rerun} --from {skipped[0]}"]
    return "\n".join(lines) + "\n"


def select(steps: list[Step], only: Sequence[str] | None, start: str | None) -> list[Step]:
    """The steps from ``start`` on (all without it), only those in ``only`` (all without it)."""
    names = [step.name for step in steps]
    for name in [*(only or []), *([start] if start else [])]:
        if name not in names:
            raise SystemExit(f"unknown step {name!r}; the steps are: {', '.join(names)}")
    if start:
        steps = steps[names.index(start):]
    return [step for step in steps if not only or step.name in only]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu-session")),
                        help="folder for the log, the summary and the e2e results (default: $OUT, else out/gpu-session)")
    parser.add_argument("--commit", help="commit the e2e rows record, where the tree has no .git (the device's copy)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_SECONDS,
                        help=f"seconds for all the steps together (default {DEFAULT_BUDGET_SECONDS})")
    parser.add_argument("--from", dest="start", metavar="STEP", help="start at this step")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    parser.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error("--budget must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    steps = select(session_steps(args.out, args.commit), args.only, args.start)
    if args.list:
        for step in steps:
            print(f"{step.name} (limit {step.limit_seconds:.0f} s)")
            print(f"    {shlex.join(step.command)}")
        return 0
    outcomes = run_session(steps, args.out, args.budget)
    rerun = "PYTHONPATH=. python3 -m benchmarks.gpu.gpu_session --out $OUT" + (f" --commit {args.commit}" if args.commit else "")
    text = summary(outcomes, rerun)
    (args.out / "summary.md").write_text(text)
    print("\n===== summary =====\n" + text, end="")
    return 0 if all(o.status == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
