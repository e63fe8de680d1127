"""Stand-ins for the first-use check's case functions (gptoss_jax.kernel_check_cases), for
tests/test_kernel_check.py: the check's child process imports them by name, as it would the real
ones. Each notes its run in the file ``$FAKE_KERNEL_RUNS`` names, so a test counts the runs."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np

from gptoss_jax.kernel_check_cases import CaseResult, compare

RUNS_VARIABLE = "FAKE_KERNEL_RUNS"
SLEEPER_PID_VARIABLE = "FAKE_KERNEL_SLEEPER_PID"


def _note_run(name: str) -> None:
    with open(os.environ[RUNS_VARIABLE], "a") as runs:
        runs.write(name + "\n")


def passes(config, sizes, interpret) -> list[CaseResult]:
    _note_run("passes")
    return [compare("the fake case", np.ones(8), np.ones(8), rtol=2**-7, atol=0.0)]


def wrong_values(config, sizes, interpret) -> list[CaseResult]:
    _note_run("wrong_values")
    got = np.ones(8)
    got[3] = 1.5
    return [compare("mlp2, 64 tokens", got, np.ones(8), rtol=2**-7, atol=0.0)]


def raises(config, sizes, interpret) -> list[CaseResult]:
    _note_run("raises")
    raise RuntimeError("the kernel exploded")


def runs_out_of_memory(config, sizes, interpret) -> list[CaseResult]:
    _note_run("runs_out_of_memory")
    raise MemoryError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1061683200 bytes.")


def never_returns(config, sizes, interpret) -> list[CaseResult]:
    """Waits forever, as a kernel deadlocked on a barrier, with a process of its own running beside it."""
    _note_run("never_returns")
    sleeper = subprocess.Popen(["sleep", "600"])
    Path(os.environ[SLEEPER_PID_VARIABLE]).write_text(str(sleeper.pid))
    Path(os.environ[SLEEPER_PID_VARIABLE]).with_suffix(".check").write_text(str(os.getpid()))
    time.sleep(600)
    return []
