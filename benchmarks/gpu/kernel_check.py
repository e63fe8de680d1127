"""The first-use kernel check on this machine's GPU, as a user's ``gptoss-jax env --check-kernels``
runs it (:mod:`gptoss_jax.kernel_check`), with the verdicts as a Markdown section for RESULTS.md.

Each kernel the model uses under ``auto`` runs once at gpt-oss-20b's shapes against its XLA
reference, in a child process under a time limit, whatever verdict is cached. From the
repository root::

    python -m benchmarks.gpu.kernel_check --results-md benchmarks/RESULTS.md

It exits 1 when a kernel failed its check, 0 otherwise (also where no kernel runs: the section
says why).

What the check costs is mostly compiling: each kernel at each of its cases' shapes goes through
the Mosaic GPU lowering, LLVM and ptxas. ``--compile-cost`` measures that on any machine, with
no GPU: it compiles each check's kernels to SASS as :mod:`benchmarks.kernels.kernel_sass` does, one
kernel's cases in one process, and times it::

    python -m benchmarks.gpu.kernel_check --compile-cost
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.gpu.e2e import git_commit
from benchmarks.kernels.kernel_cases import Case, DecodeCase, MoeCase, PrefillCase
from gptoss_jax.config import preset
from gptoss_jax.environment import describe_environment, gather_environment
from gptoss_jax.kernel_check_cases import CheckSizes


def markdown_section(report: dict[str, Any], commit: str) -> str:
    """The verdicts of :func:`~gptoss_jax.environment.gather_environment`'s report as a RESULTS.md section."""
    check = report["kernel_check"]  # None where no kernel runs
    device = report["devices"][0]["kind"] if check is None else check["combination"]["gpu"]
    lines = [f"## First-use kernel check on {device}", "",
             f"{datetime.date.today().isoformat()}, commit {commit}: `python -m benchmarks.gpu.kernel_check` "
             "(what `gptoss-jax env --check-kernels` runs).", ""]
    if check is not None:
        facts = ", ".join(f"{name} {value or 'unknown'}" for name, value in check["combination"].items())
        lines += [f"Combination: {facts}.", ""]
    if report["kernels"]["refused"]:
        return "\n".join([*lines, f"Refused: {report['kernels']['refused']}", ""]) + "\n"
    lines += ["| kernel | runs | verdict | seconds | cases |", "|---|---|---|---|---|"]
    for kernel, decision in report["kernels"]["parts"].items():
        verdict = decision["check"]
        if verdict is None:
            cells = [decision["why"], "", ""]
        else:
            cells = ["passed" if verdict["passed"] else f"FAILED: {verdict['error']}", f"{verdict['seconds']:.0f}",
                     "; ".join(verdict["cases"])]
        lines.append(f"| {kernel} | {decision['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def check_compile_cases() -> dict[str, list[Case]]:
    """The kernels the check compiles, by check: its cases' shapes at gpt-oss-20b
    (:mod:`gptoss_jax.kernel_check_cases` with the default :class:`CheckSizes`)."""
    config, sizes = preset("gpt-oss-20b"), CheckSizes()
    hidden, expert = config.hidden_size, config.intermediate_size
    windows = (config.sliding_window, None)
    return {
        "MoE experts": [MoeCase("gpt-oss-20b", matmul, tokens, config.num_experts, n, k, config.experts_per_token)
                        for matmul, n, k in (("mlp1", 2 * expert, hidden), ("mlp2", hidden, expert))
                        for tokens in sizes.moe_tokens],
        "prefill attention": [PrefillCase(sizes.prefill_tokens, window) for window in windows],
        "decode attention": [DecodeCase(sizes.decode_batch, sizes.decode_positions, window) for window in windows],
    }


def compile_cost() -> str:
    """A Markdown table: seconds to compile each check's kernels to SASS here, one process per check."""
    from benchmarks.kernels.kernel_sass import compile_kernels
    from benchmarks.kernels.sass_tools import install_tools

    tools = install_tools()
    start = time.perf_counter()
    compile_kernels([], tools, jobs=1)  # a process that compiles nothing: Python and jax starting
    startup = time.perf_counter() - start
    rows = ["| check | kernels compiled | seconds (process start included) |", "|---|---|---|",
            f"| (a process compiling nothing) | 0 | {startup:.1f} |"]
    total = 0.0
    for kernel, cases in check_compile_cases().items():
        start = time.perf_counter()
        compile_kernels(cases, tools, jobs=1)
        seconds = time.perf_counter() - start
        total += seconds
        rows.append(f"| {kernel} | {len(cases)}: {', '.join(case.name for case in cases)} | {seconds:.1f} |")
    rows.append(f"| all three | {sum(map(len, check_compile_cases().values()))} | {total:.1f} |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-md", type=Path, help="append the verdicts to this Markdown file")
    parser.add_argument("--commit", help="the commit to name, where the tree has no .git (default: git's)")
    parser.add_argument("--compile-cost", action="store_true",
                        help="time compiling each check's kernels to SASS on this machine (no GPU needed) instead")
    args = parser.parse_args(argv)
    if args.compile_cost:
        print(compile_cost(), end="")
        return 0
    report = gather_environment(check_kernels=True)
    print(describe_environment(report))
    section = markdown_section(report, args.commit or git_commit())
    print(section, end="")
    if args.results_md is not None:
        args.results_md.parent.mkdir(parents=True, exist_ok=True)
        with args.results_md.open("a") as results:
            results.write(section)
    checks = [decision["check"] for decision in report["kernels"]["parts"].values() if decision["check"]]
    return 0 if all(check["passed"] for check in checks) and not report["kernels"]["refused"] else 1


if __name__ == "__main__":
    sys.exit(main())
