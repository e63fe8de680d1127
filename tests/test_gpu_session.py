"""benchmarks/gpu/gpu_session.py: steps in order under one budget, hung steps killed whole."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu import e2e, gpu_session
from benchmarks.gpu.gpu_session import REPOSITORY, Step, run_session, summary


def python_step(name: str, code: str, limit_seconds: float = 30) -> Step:
    return Step(name, (sys.executable, "-c", code), limit_seconds)


def is_gone(pid: int, seconds: float = 5) -> bool:
    """Whether ``pid`` ends within ``seconds`` (SIGKILL lands a moment after it is sent; a zombie
    waiting for its reparented parent counts as ended)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_steps_run_in_order_within_the_budget_and_a_hung_step_is_killed_with_its_children(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(gpu_session, "MIN_STEP_SECONDS", 2.5)
    child_pid = tmp_path / "child.pid"
    hang = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
            f"open({str(child_pid)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    steps = [
        python_step("first", "print('first step output')"),
        python_step("failing", "raise SystemExit(3)"),
        python_step("hangs", hang, limit_seconds=2),
        python_step("late", "print('never')"),
    ]
    outcomes = run_session(steps, tmp_path / "out", budget_seconds=4.0)

    assert [(o.step, o.status) for o in outcomes[:3]] == [
        ("first", "passed"), ("failing", "failed (exit 3)"), ("hangs", "timed out after 2 s"),
    ]
    assert outcomes[3].step == "late" and outcomes[3].status.startswith("skipped: ")
    assert 2 <= outcomes[2].seconds < 4
    assert is_gone(int(child_pid.read_text()))

    log = (tmp_path / "out" / "session.log").read_text()
    assert "===== first" in log and "first step output" in log and "never" not in log
    assert "first step output" in capsys.readouterr().out

    text = summary(outcomes, "RERUN")
    assert "| hangs | timed out after 2 s |" in text
    assert text.endswith("left for another call: RERUN --from late\n")


def test_what_a_finished_step_leaves_running_is_killed(tmp_path):
    child_pid = tmp_path / "child.pid"
    leave_behind = (f"import subprocess; p = subprocess.Popen(['sleep', '60']); "
                    f"open({str(child_pid)!r}, 'w').write(str(p.pid))")
    (outcome,) = run_session([python_step("leaves", leave_behind)], tmp_path, budget_seconds=120)
    assert outcome.status == "passed" and outcome.seconds < 5
    assert is_gone(int(child_pid.read_text()))


def test_a_missing_program_fails_its_step_only(tmp_path):
    steps = [Step("missing", ("no-such-program-here",), 30), python_step("next", "print('ran')")]
    outcomes = run_session(steps, tmp_path, budget_seconds=120)
    assert [o.status for o in outcomes] == ["failed (exit 127)", "passed"]
    assert "left for another call" not in summary(outcomes, "RERUN")


def test_the_plan_lists_every_step_with_the_commit_and_the_output_folder(tmp_path, capsys):
    assert gpu_session.main(["--list", "--commit", "abc1234", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    names = [line.split(" (")[0] for line in printed.splitlines() if not line.startswith(" ")]
    assert names == ["env", "gptoss-env", "kernel-check", "kernel-tests", "moe-kernel", "moe-mma", "attention-kernel",
                     "structured", "e2e-20b", "e2e-120b", "e2e-120b-32k", "e2e-20b-xla", "moe-sweep", "engine-20b", "serve-20b",
                     "engine-traffic-20b"]
    e2e_lines = [line for line in printed.splitlines() if "benchmarks.gpu.e2e" in line]
    assert len(e2e_lines) == 4
    assert all("--commit abc1234" in line and f"--results-md {tmp_path}/RESULTS.md" in line for line in e2e_lines)
    assert f"-m benchmarks.gpu.kernel_check --results-md {tmp_path}/RESULTS.md --commit abc1234" in printed

    assert gpu_session.main(["--list", "--from", "e2e-120b", "--only", "e2e-120b", "moe-sweep"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")] == [
        "e2e-120b (limit 300 s)", "moe-sweep (limit 300 s)"]


def test_the_steps_commands_name_what_exists(tmp_path):
    steps = {step.name: step for step in gpu_session.session_steps(tmp_path, "abc1234")}
    assert all((REPOSITORY / path).is_file() for path in gpu_session.KERNEL_TEST_FILES)
    assert set(gpu_session.KERNEL_TEST_FILES) <= set(steps["kernel-tests"].command)
    for name in ("e2e-20b", "e2e-120b", "e2e-120b-32k", "e2e-20b-xla"):
        command, case = steps[name].command, steps[name].memory_case
        assert command[1:3] == ("-m", "benchmarks.gpu.e2e")
        args = e2e.parse_args(command[3:])
        assert args.commit == "abc1234" and args.json.parent == tmp_path
        # The memory check compiles what the step runs.
        assert (args.model, args.kernels, args.batch, args.prompt_len, args.new_tokens, args.prefill_chunk_size) == (
            case.model, case.kernels, [case.batch], case.prompt_len, case.new_tokens, case.prefill_chunk_size)
    assert e2e.parse_args(steps["e2e-20b-xla"].command[3:]).kernels == "xla"
    long_context = e2e.parse_args(steps["e2e-120b-32k"].command[3:])
    assert (long_context.batch, long_context.prompt_len, long_context.new_tokens) == ([1], 20000, 256)


def test_a_step_whose_programs_do_not_fit_the_gpu_is_left_out_and_the_rest_run(tmp_path, monkeypatch):
    fits = gpu_session.GenerateCase("gpt-oss-20b", "pallas", 1, 1024, 256)
    too_big = gpu_session.GenerateCase("gpt-oss-120b", "pallas", 64, 20000, 256)
    figures = {
        "small": {"peak_bytes": 20e9, "programs": [{"program": "decode", "peak_bytes": 20e9}]},
        "large": {"peak_bytes": 90e9, "programs": [{"program": "prefill (first chunk)", "peak_bytes": 70e9},
                                                   {"program": "decode", "peak_bytes": 90e9}]},
    }

    def fake_check(names, json_path):
        assert names == ["small", "large", "unchecked"]
        return (sys.executable, "-c", f"import json, time; time.sleep(1); "
                f"open({str(json_path)!r}, 'w').write(json.dumps({figures!r})); print('compiled')")

    monkeypatch.setattr(gpu_session, "memory_check_command", fake_check)
    monkeypatch.setattr(gpu_session, "gpu_memory_bytes", lambda: 80 << 30)
    steps = [
        python_step("kernels", "print('no memory check needed')"),
        dataclasses.replace(python_step("small", "print('small ran')"), memory_case=fits),
        dataclasses.replace(python_step("large", "print('large ran')"), memory_case=too_big),
        dataclasses.replace(python_step("unchecked", "print('unchecked ran')"), memory_case=fits),
    ]
    outcomes = run_session(steps, tmp_path / "out", budget_seconds=120, memory_check_dir=tmp_path / "memory")

    assert [o.status for o in outcomes[:2]] == ["passed", "passed"]
    assert outcomes[2].status == ("left out: its decode needs 90.0 GB, over the 81.6 GB XLA may take of this "
                                  "GPU's 85.9 GB")
    assert outcomes[3].status == "passed"  # no figure for it: it runs
    log = (tmp_path / "out" / "session.log").read_text()
    assert "compiled" in log and "large ran" not in log and "no figure for unchecked" in log
    assert "left for another call" not in summary(outcomes, "RERUN")


def test_unknown_steps_are_named(capsys):
    with pytest.raises(SystemExit, match="unknown step 'e2e'; the steps are: env, gptoss-env, kernel-check, kernel-tests"):
        gpu_session.main(["--list", "--from", "e2e"])


def test_the_engine_and_serve_steps_parse_with_their_scripts_own_parsers(tmp_path):
    from benchmarks.throughput import engine, serve

    steps = {step.name: step for step in gpu_session.session_steps(tmp_path, "abc1234")}
    engine_args = engine.parse_args(steps["engine-20b"].command[3:])
    assert (engine_args.model, engine_args.requests, engine_args.baselines) == ("gpt-oss-20b", 64, ["static"])
    assert engine_args.json == tmp_path / "engine-20b.json"
    serve_args = serve.parse_args(steps["serve-20b"].command[3:])
    assert (serve_args.model, serve_args.clients, serve_args.skip_sequential) == ("gpt-oss-20b", 64, True)
    traffic_args = engine.parse_args(steps["engine-traffic-20b"].command[3:])
    assert (traffic_args.model, traffic_args.traffic, traffic_args.prefill_budget) == ("gpt-oss-20b", ["a", "c", "b"],
                                                                                       8192)
