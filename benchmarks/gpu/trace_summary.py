"""Where a program's device time goes, from a ``jax.profiler`` trace, in plain Python.

``jax.profiler.trace(DIR)`` writes ``DIR/plugins/profile/<run>/<host>.trace.json.gz`` (Chrome
trace events). Every XLA operation that ran, a GPU kernel or a CPU thunk, is an event whose
arguments name its ``hlo_module`` (``jit__decode`` for generate's decode loop) and ``hlo_op``.
On a GPU only the device's own events count (the host's side of a launch is not device time).

Per module this gives the operations run, their summed time, the wall span from the first to
the last, and how much of that span some operation was running (``busy``). A decode loop that
keeps the device busy well below 100% is bound by launches and the loop's host round trips, not
by memory or compute: that is the first thing to read from a trace of gpt-oss's decode.

    python -m benchmarks.gpu.trace_summary DIR [--module jit__decode] [--top 20]

The device machines need nothing beyond the standard library for this; TensorBoard or xprof
read the same folder for a timeline.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DECODE_MODULE = "jit__decode"


@dataclasses.dataclass(frozen=True)
class ModuleTime:
    """One compiled program's operations in a trace (times in seconds).

    Attributes:
      module: the HLO module's name.
      calls: operations run (kernels on a GPU).
      op_seconds: their durations summed (more than the span where they overlap).
      span_seconds: from the first operation's start to the last one's end.
      busy_seconds: time in the span during which at least one operation ran.
      top_ops: ``(hlo_op, calls, seconds)`` by seconds, most first.
      from_device: the events are a device's (a GPU's kernels); False where the trace has no
        device events (the CPU backend, or a GPU trace taken without CUPTI: host-side times).
    """

    module: str
    calls: int
    op_seconds: float
    span_seconds: float
    busy_seconds: float
    top_ops: tuple[tuple[str, int, float], ...]
    from_device: bool

    @property
    def busy_fraction(self) -> float:
        return self.busy_seconds / self.span_seconds if self.span_seconds else float("nan")


def trace_file(trace_dir: Path) -> Path:
    """The newest ``*.trace.json.gz`` under ``trace_dir`` (a ``jax.profiler.trace`` folder)."""
    files = sorted(Path(trace_dir).glob("plugins/profile/*/*.trace.json.gz"), key=lambda path: path.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no plugins/profile/*/*.trace.json.gz under {trace_dir}: not a jax.profiler trace")
    return files[-1]


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _innermost(events: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The events of one thread that enclose no other: a CPU loop's or conditional's own event
    spans its body's, which would otherwise count twice."""
    events = sorted(events, key=lambda event: (event[0], -event[1]))
    return [event for event, following in zip(events, events[1:] + [None])
            if following is None or following[0] >= event[1]]


def summarize(trace_dir: Path, top: int = 20) -> dict[str, ModuleTime]:
    """Every HLO module's :class:`ModuleTime` in the newest trace under ``trace_dir``."""
    with gzip.open(trace_file(trace_dir), "rt") as f:
        events = json.load(f)["traceEvents"]
    process_names = {event["pid"]: event["args"]["name"] for event in events
                     if event.get("ph") == "M" and event.get("name") == "process_name"}
    devices = {pid for pid, name in process_names.items() if name.startswith("/device:")}
    by_thread: dict[tuple[str, int, int], list[tuple[float, float, str]]] = collections.defaultdict(list)
    for event in events:
        arguments = event.get("args") or {}
        if event.get("ph") != "X" or "hlo_module" not in arguments or (devices and event["pid"] not in devices):
            continue
        start = float(event["ts"]) * 1e-6
        end = start + float(event.get("dur", 0.0)) * 1e-6
        by_thread[arguments["hlo_module"], event["pid"], event["tid"]].append(
            (start, end, arguments.get("hlo_op", event["name"])))
    by_module: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for (module, _, _), thread_events in by_thread.items():
        by_module[module] += _innermost(thread_events)
    summaries = {}
    for module, module_events in by_module.items():
        seconds_by_op, calls_by_op = collections.Counter(), collections.Counter()
        for start, end, op in module_events:
            seconds_by_op[op] += end - start
            calls_by_op[op] += 1
        spans = [(start, end) for start, end, _ in module_events]
        summaries[module] = ModuleTime(
            module=module, calls=len(spans), op_seconds=sum(seconds_by_op.values()),
            span_seconds=max(end for _, end in spans) - min(start for start, _ in spans),
            busy_seconds=_union_length(spans),
            top_ops=tuple((op, calls_by_op[op], seconds) for op, seconds in seconds_by_op.most_common(top)),
            from_device=bool(devices),
        )
    return summaries


def format_module(summary: ModuleTime, steps: int | None = None) -> str:
    """A few lines of text: totals (per step too, given ``steps``), then the top operations."""
    per_step = "" if not steps else (f", per step {summary.calls / steps:.0f} operations, "
                                     f"{1e3 * summary.span_seconds / steps:.3f} ms")
    where = "device" if summary.from_device else "host (no device events in the trace)"
    lines = [f"{summary.module}: {summary.calls} operations in {1e3 * summary.span_seconds:.1f} ms, {where} busy "
             f"{100 * summary.busy_fraction:.0f}% of it{per_step}",
             "  calls   total ms  share  operation"]
    for op, calls, seconds in summary.top_ops:
        share = seconds / summary.op_seconds if summary.op_seconds else float("nan")
        lines.append(f"  {calls:5d} {1e3 * seconds:10.3f}  {100 * share:4.1f}%  {op}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir", type=Path, help="the folder given to jax.profiler.trace")
    parser.add_argument("--module", help="only this HLO module (e.g. jit__decode); default: all, busiest first")
    parser.add_argument("--top", type=int, default=20, help="operations listed per module")
    args = parser.parse_args(argv)
    try:
        summaries = summarize(args.trace_dir, args.top)
    except FileNotFoundError as error:
        parser.exit(2, f"error: {error}\n")
    chosen = [summaries[args.module]] if args.module in summaries else (
        [] if args.module else sorted(summaries.values(), key=lambda s: -s.busy_seconds))
    if not chosen:
        parser.exit(2, f"error: no module {args.module!r} in the trace; it has {sorted(summaries)}\n")
    print("\n\n".join(format_module(summary) for summary in chosen))


if __name__ == "__main__":
    main(sys.argv[1:])
