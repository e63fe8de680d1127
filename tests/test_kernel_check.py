"""The first-use kernel check (gptoss_jax.kernel_check) on the CPU: the device facts are faked
where the library reads them (as tests/test_env.py does) and the kernels by the stand-ins of
kernel_check_fakes.py, which the check's child process runs as it would the real cases. The real
cases run once too, in Mosaic GPU interpret mode at a small size, through the same child."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from test_env import H100, fake_cuda, fake_gpu
from test_gpu_session import is_gone

import benchmarks.gpu.e2e
import benchmarks.gpu.kernel_check
import kernel_check_fakes
from gptoss_jax import cli, kernel_check
from gptoss_jax.cache_folder import CACHE_ENV_VAR
from gptoss_jax.cli.arguments import option_flag
from gptoss_jax.config import preset
from gptoss_jax.kernel_check import (
    KERNEL_CHECKS,
    MMA_SYNC_KERNEL_CHECKS,
    KernelCheck,
    KernelCheckFailedError,
    run_kernel_check,
)
from gptoss_jax.kernel_check_cases import CheckSizes
from gptoss_jax.kernel_dispatch import KernelPlan, kernel_decisions, kernel_plan
from gptoss_jax.opening import checked_kernels

GPT_OSS_20B = preset("gpt-oss-20b")
PARTS = ("prefill_attention", "decode_attention", "experts")


def fake_checks(monkeypatch: pytest.MonkeyPatch, seconds: float = 60, **cases: str) -> None:
    """Make each part's kernel check run the fake ``cases[part]`` (``passes`` for the parts not named)."""
    for name, real in (("KERNEL_CHECKS", KERNEL_CHECKS), ("MMA_SYNC_KERNEL_CHECKS", MMA_SYNC_KERNEL_CHECKS)):
        checks = tuple(KernelCheck(check.kernel, check.part, f"kernel_check_fakes:{cases.get(check.part, 'passes')}",
                                   seconds) for check in real)
        monkeypatch.setattr(f"gptoss_jax.kernel_dispatch.{name}", checks)


@pytest.fixture
def hopper(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An H100 with a good CUDA, an empty cache folder and a fresh run log; the run log's path."""
    fake_gpu(monkeypatch, H100, "9.0")
    fake_cuda(monkeypatch, (12, 9, 86), runtime=12090)
    monkeypatch.setattr(kernel_check, "_NVIDIA_DRIVER_FILE", tmp_path / "no-driver-file")
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv("GPTOSS_JAX_KERNELS", raising=False)
    monkeypatch.delenv(kernel_check.CHECK_ENV_VAR, raising=False)
    monkeypatch.setattr(kernel_check, "_warned", set())
    runs = tmp_path / "runs.txt"
    runs.touch()
    monkeypatch.setenv(kernel_check_fakes.RUNS_VARIABLE, str(runs))
    return runs


def run_count(runs: Path) -> int:
    return len(runs.read_text().splitlines())


def test_a_failing_kernel_falls_back_to_xla_with_one_warning_and_the_others_stay(hopper, monkeypatch, caplog):
    fake_checks(monkeypatch, experts="wrong_values", prefill_attention="raises")
    with caplog.at_level(logging.WARNING):
        decisions = kernel_decisions("auto", GPT_OSS_20B, jnp.bfloat16)
        assert kernel_plan("auto", GPT_OSS_20B, jnp.bfloat16) == KernelPlan("xla", "pallas", "xla")
    assert decisions["experts"].why == ("failed its first-use check: mlp2, 64 tokens: 1 of 8 values beyond the "
                                        "tolerance (largest error 0.5)")
    assert decisions["prefill_attention"].why == (
        "failed its first-use check: crashed (exit 1): RuntimeError: the kernel exploded")
    assert decisions["decode_attention"].why.startswith(f"auto: the device is {H100} (sm_90); passed its first-use check (")
    verdict_file = kernel_check.verdict_file(kernel_check.combination())
    assert [record.getMessage() for record in caplog.records] == [
        f"gptoss-jax: the {kernel} kernel {decisions[part].why}; it runs on XLA instead; for a bug report, send "
        f"the output of `gptoss-jax env --json` and {verdict_file}"
        for kernel, part in (("MoE experts", "experts"), ("prefill attention", "prefill_attention"))
    ]  # once each, though the plan was made twice
    assert run_count(hopper) == 3  # the second plan found the verdicts


def test_the_mma_sync_expert_kernel_is_checked_where_it_runs(hopper, monkeypatch, caplog):
    fake_gpu(monkeypatch, "NVIDIA L4", "8.9")
    fake_checks(monkeypatch)
    assert kernel_plan("auto", GPT_OSS_20B, jnp.bfloat16) == KernelPlan("xla", "xla", "pallas")
    assert run_count(hopper) == 1  # the experts' check; attention runs on XLA here, unchecked
    content = json.loads(kernel_check.verdict_file(kernel_check.combination()).read_text())
    assert list(content["verdicts"]) == ["MoE experts (mma.sync)"]

    fake_checks(monkeypatch, experts="wrong_values")
    with caplog.at_level(logging.WARNING):
        assert kernel_plan("auto", GPT_OSS_20B, jnp.bfloat16, check="again") == KernelPlan("xla", "xla", "xla")
    assert "the MoE experts (mma.sync) kernel failed its first-use check" in caplog.text


def test_a_kernel_that_never_returns_is_killed_with_all_it_started(hopper, monkeypatch, tmp_path):
    sleeper_pid = tmp_path / "sleeper.pid"
    monkeypatch.setenv(kernel_check_fakes.SLEEPER_PID_VARIABLE, str(sleeper_pid))
    # Long enough for the child to import jax and start its sleeper on a loaded machine.
    hung = KernelCheck("MoE experts", "experts", "kernel_check_fakes:never_returns", time_limit_s=20)
    verdict = run_kernel_check(hung, GPT_OSS_20B)
    assert (verdict.passed, verdict.error) == (False, "timed out after 20 s (the check was killed)")
    assert 20 <= verdict.seconds < 40
    assert is_gone(int(sleeper_pid.read_text()))


def test_a_program_killed_during_its_check_takes_the_check_with_it(hopper, monkeypatch, tmp_path):
    sleeper_pid = tmp_path / "sleeper.pid"
    monkeypatch.setenv(kernel_check_fakes.SLEEPER_PID_VARIABLE, str(sleeper_pid))
    program = subprocess.Popen([sys.executable, "-c", (
        "from gptoss_jax.config import preset; from gptoss_jax.kernel_check import KernelCheck, run_kernel_check; "
        "run_kernel_check(KernelCheck('MoE experts', 'experts', 'kernel_check_fakes:never_returns', 600), "
        "preset('gpt-oss-20b'))")], env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, sys.path))))
    check_pid = sleeper_pid.with_suffix(".check")
    deadline = time.monotonic() + 60
    while not check_pid.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    program.kill()
    program.wait()
    assert is_gone(int(check_pid.read_text()))
    os.kill(int(sleeper_pid.read_text()), signal.SIGKILL)  # what the check started outlives it here


def change_gpu(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, "NVIDIA H100 PCIe", "9.0")


def change_driver(monkeypatch, tmp_path):
    driver = tmp_path / "driver-version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    monkeypatch.setattr(kernel_check, "_NVIDIA_DRIVER_FILE", driver)


def change_cuda(monkeypatch, tmp_path):
    fake_cuda(monkeypatch, (12, 9, 86), runtime=12080)


def change_ptxas(monkeypatch, tmp_path):
    fake_cuda(monkeypatch, (13, 0, 88), runtime=12090)


def change_jax(monkeypatch, tmp_path):
    monkeypatch.setattr(jax, "__version__", "0.11.3")


def change_kernel_sources(monkeypatch, tmp_path):
    """A copy of the sources with one kernel edited."""
    root = tmp_path / "sources"
    shutil.copytree(kernel_check._PACKAGE_ROOT / "pallas_kernels", root / "pallas_kernels")
    shutil.copytree(kernel_check._PACKAGE_ROOT / "gptoss_jax", root / "gptoss_jax")
    with open(root / "pallas_kernels" / "mxfp4_moe.py", "a") as kernel:
        kernel.write("# edited\n")
    monkeypatch.setattr(kernel_check, "_PACKAGE_ROOT", root)


def change_model(monkeypatch, tmp_path):
    return preset("gpt-oss-120b")


@pytest.mark.parametrize("change", [change_gpu, change_driver, change_cuda, change_ptxas, change_jax,
                                    change_kernel_sources, change_model])
def test_the_verdict_is_cached_per_combination_and_a_change_checks_again(hopper, monkeypatch, tmp_path, change):
    only_experts = (KernelCheck("MoE experts", "experts", "kernel_check_fakes:passes", 60),)
    monkeypatch.setattr("gptoss_jax.kernel_dispatch.KERNEL_CHECKS", only_experts)
    decide = functools.partial(kernel_decisions, "auto", dtype=jnp.bfloat16)
    assert decide(config=GPT_OSS_20B)["experts"].check.passed
    assert decide(config=GPT_OSS_20B)["experts"].check.passed
    assert run_count(hopper) == 1
    config = change(monkeypatch, tmp_path) or GPT_OSS_20B
    assert decide(config=config)["experts"].check.passed
    assert run_count(hopper) == 2


def test_pallas_asked_for_fails_loudly_instead_of_falling_back(hopper, monkeypatch):
    fake_checks(monkeypatch, experts="wrong_values")
    with pytest.raises(KernelCheckFailedError) as raised:  # open_model's check, before any weight is read
        checked_kernels("pallas", GPT_OSS_20B, "bfloat16", option_flag)
    verdict_file = kernel_check.verdict_file(kernel_check.combination())
    assert str(raised.value) == (
        "--kernels pallas: the MoE experts kernel failed its first-use check: mlp2, 64 tokens: 1 of 8 values beyond "
        "the tolerance (largest error 0.5); use --kernels auto to run it on XLA, and for a bug report, send the "
        f"output of `gptoss-jax env --json` and {verdict_file}")
    monkeypatch.setenv("GPTOSS_JAX_KERNELS", "pallas")  # the model itself, asked through the environment
    with pytest.raises(KernelCheckFailedError, match=r"^GPTOSS_JAX_KERNELS=pallas: the MoE experts kernel failed "
                                                     r".*; unset GPTOSS_JAX_KERNELS to run it on XLA"):
        kernel_plan("auto", GPT_OSS_20B, jnp.bfloat16)
    assert run_count(hopper) == 1  # the first failure refuses; its verdict was kept


def test_a_check_out_of_gpu_memory_falls_back_but_is_not_kept(hopper, monkeypatch):
    fake_checks(monkeypatch, experts="runs_out_of_memory")
    decision = kernel_decisions("auto", GPT_OSS_20B, jnp.bfloat16)["experts"]
    assert decision.runs == "xla"
    assert decision.why == (
        "could not run its first-use check: out of GPU memory (crashed (exit 1): MemoryError: RESOURCE_EXHAUSTED: "
        "Out of memory while trying to allocate 1061683200 bytes.); run `gptoss-jax env --check-kernels` while no "
        "model holds the GPU, or give XLA less of it (XLA_PYTHON_CLIENT_MEM_FRACTION)")
    kernel_decisions("auto", GPT_OSS_20B, jnp.bfloat16)
    assert hopper.read_text().splitlines().count("runs_out_of_memory") == 2  # checked again


def test_the_check_can_be_turned_off(hopper, monkeypatch):
    fake_checks(monkeypatch, experts="wrong_values")
    monkeypatch.setenv(kernel_check.CHECK_ENV_VAR, "0")
    decisions = kernel_decisions("pallas", GPT_OSS_20B, jnp.bfloat16)
    assert {part: decision.runs for part, decision in decisions.items()} == dict.fromkeys(PARTS, "pallas")
    assert decisions["experts"].why == "kernels='pallas' asked for; unchecked (GPTOSS_JAX_KERNEL_CHECK=0)"
    assert run_count(hopper) == 0


def test_env_reports_verdicts_and_runs_the_check_only_when_asked(hopper, monkeypatch, capsys, request):
    request.addfinalizer(functools.partial(jax.config.update, "jax_compilation_cache_dir",
                                           jax.config.jax_compilation_cache_dir))
    fake_checks(monkeypatch, experts="wrong_values")

    def kernel_lines(*arguments: str) -> list[str]:
        assert cli.main(["env", *arguments]) == 0
        lines = capsys.readouterr().out.splitlines()
        return [line for line in lines if line.startswith(("  MoE", "  prefill", "  decode", "first-use"))]

    not_yet = f"pallas  auto: the device is {H100} (sm_90); not checked here yet (gptoss-jax env --check-kernels)"
    assert kernel_lines()[:3] == [f"  MoE experts        {not_yet}", f"  prefill attention  {not_yet}",
                                  f"  decode attention   {not_yet}"]
    assert run_count(hopper) == 0

    checked = kernel_lines("--check-kernels")
    assert checked[0] == ("  MoE experts        xla     failed its first-use check: mlp2, 64 tokens: 1 of 8 values "
                          "beyond the tolerance (largest error 0.5)")
    for line in checked[1:3]:
        assert f"pallas  auto: the device is {H100} (sm_90); passed its first-use check (" in line
    facts = kernel_check.combination()
    assert checked[3] == (f"first-use kernel checks (gpu {H100}, driver CUDA 12.9, cuda 12.9, ptxas 12.9.86, jax "
                          f"{jax.__version__}, jaxlib {facts['jaxlib']}, kernels {facts['kernels']}): "
                          f"{kernel_check.verdict_file(facts)}")
    assert run_count(hopper) == 3
    assert kernel_lines() == checked  # from the cache
    assert run_count(hopper) == 3
    kernel_lines("--check-kernels")  # on demand: again
    assert run_count(hopper) == 6

    assert cli.main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kernels"]["parts"]["MoE experts"]["check"]["cases"] == [
        "mlp2, 64 tokens: 1 of 8 values beyond the tolerance (largest error 0.5)"]
    assert report["kernel_check"]["combination"] == facts


def test_the_gpu_sessions_step_puts_the_verdicts_before_the_e2e_table(hopper, monkeypatch, tmp_path, capsys):
    fake_checks(monkeypatch, experts="raises")
    results = tmp_path / "RESULTS.md"
    assert benchmarks.gpu.kernel_check.main(["--results-md", str(results), "--commit", "abc1234"]) == 1
    benchmarks.gpu.e2e.append_row(results, "| an e2e row |\n")
    lines = results.read_text().splitlines()
    assert lines[0] == f"## First-use kernel check on {H100}"
    assert lines[2].endswith(", commit abc1234: `python -m benchmarks.gpu.kernel_check` (what `gptoss-jax env "
                             "--check-kernels` runs).")
    table = lines[lines.index("| kernel | runs | verdict | seconds | cases |"):]
    assert table[2].startswith("| MoE experts | xla | FAILED: crashed (exit 1): RuntimeError: the kernel exploded | ")
    assert table[3].startswith("| prefill attention | pallas | passed | ")
    assert table[3].endswith(" | the fake case: within the tolerance (largest error 0) |")
    assert lines[-1] == "| an e2e row |" and benchmarks.gpu.e2e.RESULTS_HEADER.splitlines()[0] in lines


@pytest.mark.parametrize("check", KERNEL_CHECKS + MMA_SYNC_KERNEL_CHECKS, ids=lambda check: check.kernel)
def test_the_real_check_passes_in_interpret_mode(check):
    """The cases and the child process end to end, at the kernel tests' small interpret-mode sizes."""
    config = dataclasses.replace(preset("tiny"), hidden_size=192, intermediate_size=384, head_dim=64,
                                 num_attention_heads=8, num_key_value_heads=1)
    sizes = CheckSizes(moe_tokens=(3,), decode_batch=2, decode_positions=96, prefill_tokens=24)
    verdict = run_kernel_check(check, config, sizes, interpret=True)
    assert verdict.passed, verdict.error
    assert len(verdict.cases) == 2 and all("within the tolerance" in case for case in verdict.cases)
