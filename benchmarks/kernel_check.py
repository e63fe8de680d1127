"""The first-use kernel check on this machine's GPU, as a user's ``gptoss-jax env --check-kernels``
runs it (:mod:`gptoss_jax.kernel_check`), with the verdicts as a Markdown section for RESULTS.md.

Each kernel the model uses under ``auto`` runs once at gpt-oss-20b's shapes against its XLA
reference, in a child process under a time limit, whatever verdict is cached. From the
repository root::

    python -m benchmarks.kernel_check --results-md benchmarks/RESULTS.md

It exits 1 when a kernel failed its check, 0 otherwise (also where no kernel runs: the section
says why).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.e2e import git_commit
from gptoss_jax.environment import describe_environment, gather_environment


def markdown_section(report: dict[str, Any], commit: str) -> str:
    """The verdicts of :func:`~gptoss_jax.environment.gather_environment`'s report as a RESULTS.md section."""
    check = report["kernel_check"]  # None where no kernel runs
    device = report["devices"][0]["kind"] if check is None else check["combination"]["gpu"]
    lines = [f"## First-use kernel check on {device}", "",
             f"{datetime.date.today().isoformat()}, commit {commit}: `python -m benchmarks.kernel_check` "
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-md", type=Path, help="append the verdicts to this Markdown file")
    parser.add_argument("--commit", help="the commit to name, where the tree has no .git (default: git's)")
    args = parser.parse_args(argv)
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
