"""benchmarks/gpu/trace_summary.py on hand-made traces: which events count, and how busy is measured."""

from __future__ import annotations

import gzip
import json

import pytest

from benchmarks.gpu import trace_summary


def write_trace(folder, events, processes):
    run = folder / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    metadata = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}} for pid, name in processes.items()]
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": metadata + events}, f)


def op(pid, tid, start_us, duration_us, name, module="jit__decode"):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": start_us, "dur": duration_us, "name": name,
            "args": {"hlo_module": module, "hlo_op": name}}


def test_gpu_trace_counts_device_kernels_only_and_overlaps_once(tmp_path):
    write_trace(tmp_path, [
        op(1, 7, 0, 500, "launch"),  # the host's side of a launch: not device time
        op(2, 1, 0, 10, "fusion.1"), op(2, 2, 5, 10, "fusion.2"),  # two streams overlapping 5 us
        op(2, 1, 30, 10, "fusion.1"),
        op(2, 1, 100, 4, "copy", module="jit_other"),
        {"ph": "X", "pid": 2, "tid": 1, "ts": 50, "dur": 1, "name": "memset", "args": {}},  # no module
    ], {1: "/host:CPU", 2: "/device:GPU:0"})
    summaries = trace_summary.summarize(tmp_path)
    assert set(summaries) == {"jit__decode", "jit_other"}
    decode = summaries["jit__decode"]
    assert decode.calls == 3
    assert decode.op_seconds == pytest.approx(30e-6)
    assert decode.span_seconds == pytest.approx(40e-6)
    assert decode.busy_seconds == pytest.approx(25e-6) and decode.busy_fraction == pytest.approx(25 / 40)
    assert decode.top_ops[0][:2] == ("fusion.1", 2) and decode.top_ops[0][2] == pytest.approx(20e-6)
    text = trace_summary.format_module(decode, steps=3)
    assert decode.from_device
    assert text.startswith("jit__decode: 3 operations in 0.0 ms, device busy 62% of it, per step 1 operations")


def test_cpu_trace_counts_a_loop_body_not_the_loop_around_it(tmp_path):
    write_trace(tmp_path, [
        op(1, 3, 0, 100, "while.1"), op(1, 3, 10, 10, "dot.2"), op(1, 3, 30, 20, "fusion.3"),
        op(1, 4, 40, 20, "fusion.4"),  # another worker thread, overlapping fusion.3
    ], {1: "/host:CPU"})
    decode = trace_summary.summarize(tmp_path)["jit__decode"]
    assert [name for name, _, _ in decode.top_ops] == ["fusion.3", "fusion.4", "dot.2"]
    assert decode.span_seconds == pytest.approx(50e-6)  # from dot.2's start to fusion.4's end
    assert decode.busy_seconds == pytest.approx(40e-6)
    assert not decode.from_device and "host (no device events in the trace) busy 80%" in trace_summary.format_module(decode)


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        trace_summary.main([str(tmp_path)])
    assert exit_info.value.code == 2 and "not a jax.profiler trace" in capsys.readouterr().err
    write_trace(tmp_path, [op(1, 1, 0, 1, "dot")], {1: "/host:CPU"})
    with pytest.raises(SystemExit):
        trace_summary.main([str(tmp_path), "--module", "jit_missing"])
    assert "['jit__decode']" in capsys.readouterr().err
    trace_summary.main([str(tmp_path), "--module", "jit__decode"])
    assert capsys.readouterr().out.startswith("jit__decode: 1 operations")
