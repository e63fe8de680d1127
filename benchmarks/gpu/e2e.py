"""End-to-end generation at the real gpt-oss shapes, measured against the HBM roofline.

Builds ``GptOss`` with the exact gpt-oss-20b or gpt-oss-120b shapes and random weights (MXFP4
expert blocks and scales drawn directly as uint8), drawn on the device part by part
(:mod:`gptoss_jax.random_weights`), so 120b's 65 GB never passes through the host and exists
once, with one part's temporaries beside it. Then, per batch
size, runs :func:`gptoss_jax.generate` greedily with no stop tokens (every row generates the
full length) from random prompts: once to compile and warm up, once timed.

Per run it reports prefill and decode tokens/s, time to first token, peak device memory, the
parameter bytes, the compile time, and decode as a fraction of the HBM roofline: the bytes a
decode step must read (below) over the device's peak bandwidth, summed over the steps, divided
by the measured decode time.

Bytes a decode step must read, at batch B and context c (the tokens the new one attends to):

* experts: the MXFP4 weights and biases of the distinct experts the batch touches; with top-k of
  E and uniform routing, E * (1 - (1 - k/E)**B) per layer on average;
* attention, router and norms: all of them; the unembedding: all of it; the embedding: B rows;
* the KV cache: keys, values and slot positions of min(c, window) tokens on sliding layers and
  c tokens on full layers.

Activations and the KV writes (one token per row) are left out; they are small next to these.

Goals (one H100 80 GB; the bounds are this arithmetic at 3.35 TB/s):

* gpt-oss-120b loads and decodes on one H100 with a 32K-token cache. ``generate`` rounds its
  cache up to a power of two, so any prompt + new tokens in (16K, 32K] runs with a 32K cache:
  ``--model gpt-oss-120b --batch 1 --prompt-len 20000 --new-tokens 256``.
* Batch-1 decode: gpt-oss-20b >= 600 tokens/s, gpt-oss-120b >= 450 tokens/s (bandwidth bounds
  about 905 and 674; SGLang reports 318 for 120b on H100).
* Batch 64, 1K prompt / 1K new: gpt-oss-20b >= 11,500 output tokens/s (TensorRT-LLM: 11,557).

Compile time weighs on a short run at the real depths: the kernels are jitted, so each distinct
kernel call goes through the Mosaic GPU lowering once (2 to 3 s of one CPU core, measured on the
CPU) and the layers share it, but prefill and decode compile again for every batch size.
``--quick`` therefore runs one batch size; give each further batch size a call of its own.

``--profile DIR`` runs each batch size a third time under ``jax.profiler.trace`` (a trace per
batch size in ``DIR/batch-B``, for TensorBoard or xprof) and prints where the decode loop's time
goes: operations per step, the device's busy fraction (well below 100% means the loop is bound
by kernel launches and host round trips, not by the bytes it reads) and the costliest
operations (:mod:`benchmarks.gpu.trace_summary`).

Every run appends its row to ``--results-md`` (default benchmarks/RESULTS.md) and rewrites the
``--json`` file as soon as it finishes, so a crash or a timeout keeps the runs before it.

Usage (from the repository root)::

    python -m benchmarks.gpu.e2e --model gpt-oss-20b                 # batch 1, 8, 64; 1K/1K
    python -m benchmarks.gpu.e2e --model gpt-oss-120b --quick        # batch 1, 1K/256: one 10-minute slot
    python -m benchmarks.gpu.e2e --model gpt-oss-20b --quick --profile /tmp/e2e-trace   # where decode time goes
    python -m benchmarks.gpu.e2e --model tiny --prompt-len 16 --new-tokens 8 --batch 1 2   # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.gpu.gpu_measure import device_peaks
from benchmarks.gpu.trace_summary import DECODE_MODULE, format_module, summarize
from gptoss_jax.config import GptOssConfig, preset
from gptoss_jax.footprint import parameter_bytes
from gptoss_jax.generate import generate
from gptoss_jax.kernel_dispatch import resolve_kernels
from gptoss_jax.model import GptOss
from gptoss_jax.opening import give_xla_most_of_the_gpu
from gptoss_jax.random_weights import random_model

REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS_MD = REPOSITORY / "benchmarks" / "RESULTS.md"
DEFAULT_JSON_DIR = REPOSITORY / "benchmarks" / "results"

# footprint.parameter_bytes's categories.
_EXPERT_PARTS = ("experts (MXFP4 blocks + scales)", "expert biases (bf16)")
_DENSE_PART = "attention, router, norms"
_EMBEDDING_TABLES_PART = "embedding + unembedding (bf16)"

# Prompt tokens of all rows per prefill step, by default, so that the kernels and the XLA path
# run the same schedule. The XLA path bounds it: its float32 attention scores are
# [B, Hq, chunk, cache + chunk], at batch 64, 512-token chunks and a 2K cache 21 GB, where 120b's
# weights are 65 GB of an H100's 80. The kernels hold no scores.
PREFILL_TOKENS_PER_STEP = 8192

# One batch size: each new batch size compiles prefill and decode again, which takes minutes at
# the real depths (see the module docstring).
QUICK = dict(batch=[1], prompt_len=1024, new_tokens=256)
FULL = dict(batch=[1, 8, 64], prompt_len=1024, new_tokens=1024)

RESULTS_HEADER = """\
# End-to-end benchmark results

Rows are appended by `python -m benchmarks.gpu.e2e` (see its docstring), one per run: random weights
at the model's exact shapes, random prompts of `prompt` tokens, greedy decoding of `new` tokens
per row with no stop tokens, after a warm-up run of the same shapes.

Goals on one H100 80 GB: gpt-oss-120b loads and decodes with a 32K-token cache; batch-1 decode
gpt-oss-20b >= 600 tok/s and gpt-oss-120b >= 450 tok/s; batch 64 at 1K/1K gpt-oss-20b >= 11,500
output tok/s.

Columns:

* **commit**: `git rev-parse --short HEAD`, `-dirty` when tracked files differ from it.
* **kernels**: `pallas` (Mosaic GPU kernels) or `xla` (the references), as resolved.
* **prefill tok/s**: prompt tokens of all rows over the prefill's wall time.
* **decode tok/s**: generated tokens of all rows over the decode loop's wall time (output tokens).
* **TTFT s**: time to first token: the prefill's wall time (the first token is the argmax of the
  prefill's last logits).
* **roofline %**: the time the bytes a decode step must read (active experts for the batch,
  attention, router, norms, unembedding, the KV cache at the current context) take at the
  device's peak HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s), summed over the steps, as a
  percentage of the measured decode time; `n/a` on the CPU and on GPUs not in the table.
* **peak GB**: `peak_bytes_in_use` of the device since the process started (it includes earlier,
  smaller runs of the same invocation); `n/a` where the backend does not report it.
* **params GB**: parameter bytes on the device (MXFP4 experts packed).
* **compile s**: seconds compiling prefill and decode (the warm-up run's).

| date | commit | device | model | kernels | batch | prompt | new | prefill tok/s | decode tok/s | TTFT s | roofline % | peak GB | params GB | compile s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def build_model(config: GptOssConfig, kernels: str, seed: int) -> GptOss:
    """A bfloat16 model with random weights, drawn on the default device part by part
    (:func:`gptoss_jax.random_weights.random_model`: the parameters plus one part's temporaries)."""
    return random_model(config, seed=seed, dtype=jnp.bfloat16, kernels=kernels, progress=True)


def expected_distinct_experts(num_experts: int, experts_per_token: int, batch: int) -> float:
    """Experts a layer touches on average when ``batch`` tokens each pick ``experts_per_token`` uniformly."""
    return num_experts * (1.0 - (1.0 - experts_per_token / num_experts) ** batch)


def decode_step_bytes(
    config: GptOssConfig, parts: dict[str, int], batch: int, context: int, cache_itemsize: int
) -> dict[str, float]:
    """Bytes one decode step must read from device memory, by kind.

    Args:
      config: the model's shapes.
      parts: :func:`gptoss_jax.footprint.parameter_bytes` of the model.
      batch: rows decoded together.
      context: positions each new token attends to, itself included.
      cache_itemsize: bytes per key or value element in the KV cache.

    Returns:
      ``experts``, ``dense`` (attention, router, norms), ``embedding`` (the batch's rows and the
      whole unembedding) and ``kv_cache`` bytes.
    """
    all_experts = sum(parts[name] for name in _EXPERT_PARTS)
    touched = expected_distinct_experts(config.num_experts, config.experts_per_token, batch)
    # The embedding and unembedding tables have the same shape [V, H] and dtype.
    table = parts[_EMBEDDING_TABLES_PART] / 2
    kv_bytes_per_slot = 2 * config.num_key_value_heads * config.head_dim * cache_itemsize + 4  # + int32 position
    slots_read = sum(
        min(context, config.sliding_window) if config.is_sliding(layer) else context
        for layer in range(config.num_hidden_layers)
    )
    return {
        "experts": all_experts * touched / config.num_experts,
        "dense": float(parts[_DENSE_PART]),
        "embedding": table + table * batch / config.vocab_size,
        "kv_cache": float(batch * slots_read * kv_bytes_per_slot),
    }


def decode_roofline_seconds(
    config: GptOssConfig, parts: dict[str, int], batch: int, prompt_len: int, new_tokens: int,
    cache_itemsize: int, bandwidth: float,
) -> float:
    """The fewest seconds the decode loop can take at ``bandwidth`` bytes/s.

    The first new token comes from the prefill's logits; the loop's step ``s`` (0-based) then
    feeds the token at position ``prompt_len + s``, which attends to ``prompt_len + s + 1``
    positions, so ``new_tokens`` tokens take ``new_tokens - 1`` steps.
    """
    total = sum(
        sum(decode_step_bytes(config, parts, batch, prompt_len + step + 1, cache_itemsize).values())
        for step in range(new_tokens - 1)
    )
    return total / bandwidth


def peak_bandwidth(device: jax.Device) -> float | None:
    """Datasheet HBM bytes/s of a known NVIDIA GPU; None elsewhere (no roofline on the CPU)."""
    peaks = device_peaks(device)
    return None if peaks is None else peaks.hbm_bytes_per_second


def memory_stat(device: jax.Device, key: str) -> int | None:
    """One of ``device.memory_stats()``; None where the backend keeps none (the CPU)."""
    stats = device.memory_stats()
    return None if stats is None or key not in stats else int(stats[key])


def git_commit() -> str:
    """Short HEAD, with ``-dirty`` when tracked files differ from it; ``unknown`` outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPOSITORY, capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPOSITORY,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if changed else head


def default_prefill_chunk_size(batch: int) -> int:
    """Prompt tokens per row per prefill step: :data:`PREFILL_TOKENS_PER_STEP` over the rows,
    a power of two between 16 and ``generate``'s default 512."""
    return min(512, max(16, 1 << (PREFILL_TOKENS_PER_STEP // batch).bit_length() - 1))


def profiled_decode(model: GptOss, prompts: np.ndarray, options: dict[str, Any], trace_dir: Path,
                    steps: int) -> dict[str, Any]:
    """Run ``generate`` once more under ``jax.profiler.trace(trace_dir)``; the decode loop's figures.

    Python and most host events are left out of the trace, which keeps it small; the device's
    kernels (on a GPU) or XLA's operations (on the CPU) are all there.
    """
    options_for_trace = jax.profiler.ProfileOptions()
    options_for_trace.python_tracer_level = 0
    options_for_trace.host_tracer_level = 1
    with jax.profiler.trace(trace_dir, profiler_options=options_for_trace):
        generate(model, prompts, **options)
    decode = summarize(trace_dir)[DECODE_MODULE]
    if jax.devices()[0].platform == "gpu" and not decode.from_device:
        print("warning: the trace has no GPU kernel events (CUPTI missing?); its times are the host's", flush=True)
    return {
        "trace_dir": str(trace_dir),
        "summary": format_module(decode, steps),
        "operations_per_step": decode.calls / steps if steps else None,
        "span_seconds": decode.span_seconds,
        "busy_fraction": decode.busy_fraction,
        "top_ops": [{"op": op, "calls": calls, "seconds": seconds} for op, calls, seconds in decode.top_ops],
    }


def run_once(
    model: GptOss, parts: dict[str, int], batch: int, prompt_len: int, new_tokens: int, prefill_chunk_size: int,
    seed: int, bandwidth: float | None, trace_dir: Path | None = None,
) -> dict[str, Any]:
    """Warm up, then time one ``generate`` of ``batch`` random prompts; the run's figures.

    With ``trace_dir``, a third, profiled run follows the timed one (see :func:`profiled_decode`).
    """
    config = model.config
    prompts = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, prompt_len), dtype=np.int32)
    options = dict(max_new_tokens=new_tokens, temperature=0.0, stop_tokens=(), prefill_chunk_size=prefill_chunk_size)
    # Same shapes, so the timed run reuses the warm-up's executables: it compiles nothing.
    warmup = generate(model, prompts, **options)
    output = generate(model, prompts, **options)
    if any(len(row) != new_tokens for row in output.tokens):
        raise RuntimeError(f"a row stopped early: lengths {sorted({len(row) for row in output.tokens})}")
    stats = output.stats
    device = jax.devices()[0]
    cache_itemsize = jnp.dtype(model.dtype).itemsize
    step_bytes = decode_step_bytes(config, parts, batch, prompt_len + 1, cache_itemsize)
    roofline = (None if bandwidth is None else decode_roofline_seconds(
        config, parts, batch, prompt_len, new_tokens, cache_itemsize, bandwidth))
    run = {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_chunk_size": prefill_chunk_size,
        "prefill_tokens": stats.prefill_tokens,
        "prefill_seconds": stats.prefill_seconds,
        "prefill_tokens_per_second": stats.prefill_tokens_per_second,
        "time_to_first_token_seconds": stats.prefill_seconds,
        "decode_tokens": stats.decode_tokens,
        "decode_seconds": stats.decode_seconds,
        "decode_tokens_per_second": stats.decode_tokens_per_second,
        "compile_seconds": warmup.stats.compile_seconds,
        "timed_run_compile_seconds": stats.compile_seconds,
        "peak_bytes_in_use": memory_stat(device, "peak_bytes_in_use"),
        "expected_distinct_experts": expected_distinct_experts(config.num_experts, config.experts_per_token, batch),
        "first_decode_step_bytes": step_bytes,
        "decode_roofline_seconds": roofline,
        "decode_roofline_fraction": None if roofline is None else roofline / stats.decode_seconds,
    }
    if trace_dir is not None:
        run["decode_trace"] = profiled_decode(model, prompts, options, trace_dir, new_tokens - 1)
    return run


def _figure(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value / scale:,.{digits}f}"


def markdown_row(header: dict[str, Any], run: dict[str, Any]) -> str:
    """One line of the RESULTS.md table (columns as in :data:`RESULTS_HEADER`)."""
    fraction = run["decode_roofline_fraction"]
    cells = [
        header["date"], header["commit"], header["device_kind"], header["model"], header["kernels"],
        str(run["batch"]), str(run["prompt_len"]), str(run["new_tokens"]),
        _figure(run["prefill_tokens_per_second"]), _figure(run["decode_tokens_per_second"]),
        _figure(run["time_to_first_token_seconds"], digits=3),
        _figure(None if fraction is None else 100 * fraction),
        _figure(run["peak_bytes_in_use"], 1e9, 2), _figure(header["parameter_bytes"], 1e9, 2),
        _figure(run["compile_seconds"]),
    ]
    return "| " + " | ".join(cells) + " |\n"


_TABLE_COLUMNS = RESULTS_HEADER.splitlines()[-2]  # the table's first line


def append_row(path: Path, row: str) -> None:
    """Append a table row, writing the header first where the file has no table yet (a new file, or one
    that another step, the session's kernel check, began)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or _TABLE_COLUMNS not in path.read_text():
        with path.open("a") as f:
            f.write(RESULTS_HEADER)
    with path.open("a") as f:
        f.write(row)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt-oss-20b", choices=["gpt-oss-20b", "gpt-oss-120b", "small", "tiny"])
    parser.add_argument("--quick", action="store_true",
                        help=f"defaults that fit a 10-minute slot on one H100: {QUICK}")
    parser.add_argument("--batch", type=int, nargs="+", help=f"batch sizes (default {FULL['batch']})")
    parser.add_argument("--prompt-len", type=int, help=f"prompt tokens per row (default {FULL['prompt_len']})")
    parser.add_argument("--new-tokens", type=int, help=f"generated tokens per row (default {FULL['new_tokens']})")
    parser.add_argument("--prefill-chunk-size", type=int,
                        help=f"prompt tokens per row per prefill step (default: {PREFILL_TOKENS_PER_STEP} over the "
                             "batch, a power of two in [16, 512])")
    parser.add_argument("--kernels", default="auto", choices=["auto", "pallas", "xla", "interpret"])
    parser.add_argument("--seed", type=int, default=0, help="weights and prompts")
    parser.add_argument("--json", type=Path, help="result file (default benchmarks/results/e2e-MODEL-DATE.json)")
    parser.add_argument("--results-md", type=Path, default=DEFAULT_RESULTS_MD, help="Markdown table to append to")
    parser.add_argument("--commit", help="commit to record, where the checkout has no .git (default: git)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after each timed run, run once more under jax.profiler.trace(DIR/batch-B) and print "
                             "where the decode loop's device time goes (benchmarks/gpu/trace_summary.py)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.batch) < 1 or args.prompt_len < 1 or args.new_tokens < 1 or (args.prefill_chunk_size or 1) < 1:
        parser.error("--batch, --prompt-len, --new-tokens and --prefill-chunk-size must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to the JSON file."""
    args = parse_args(argv)
    give_xla_most_of_the_gpu()  # before the backend starts
    config = preset(args.model)
    device = jax.devices()[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    json_path = args.json or DEFAULT_JSON_DIR / f"e2e-{args.model}-{now:%Y%m%dT%H%M%SZ}.json"
    parts = parameter_bytes(config)
    bandwidth = peak_bandwidth(device)

    start = time.perf_counter()
    model = build_model(config, args.kernels, args.seed)
    jax.block_until_ready(nnx.state(model))
    report: dict[str, Any] = {
        "date": f"{now:%Y-%m-%d}",
        "commit": args.commit or git_commit(),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "model": args.model,
        "config": dataclasses.asdict(config),
        "kernels": resolve_kernels(args.kernels),
        "parameter_bytes": sum(parts.values()),
        "parameter_parts": parts,
        "build_seconds": time.perf_counter() - start,
        "bytes_in_use_after_build": memory_stat(device, "bytes_in_use"),
        "peak_hbm_bytes_per_second": bandwidth,
        "runs": [],
    }
    print(f"{args.model} on {device.device_kind} ({report['kernels']} kernels): "
          f"{report['parameter_bytes'] / 1e9:.2f} GB of parameters, built in {report['build_seconds']:.1f} s",
          flush=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for batch in args.batch:
        chunk = args.prefill_chunk_size or default_prefill_chunk_size(batch)
        trace_dir = None if args.profile is None else args.profile / f"batch-{batch}"
        run = run_once(model, parts, batch, args.prompt_len, args.new_tokens, chunk, args.seed, bandwidth, trace_dir)
        report["runs"].append(run)
        json_path.write_text(json.dumps(report, indent=2))
        append_row(args.results_md, markdown_row(report, run))
        fraction = run["decode_roofline_fraction"]
        print(f"batch {batch:3d}: prefill {run['prefill_tokens_per_second']:10,.1f} tok/s, "
              f"decode {run['decode_tokens_per_second']:10,.1f} tok/s"
              + ("" if fraction is None else f" ({100 * fraction:.1f}% of the HBM roofline)")
              + f", TTFT {run['time_to_first_token_seconds']:.3f} s, compile {run['compile_seconds']:.1f} s, "
              f"peak {_figure(run['peak_bytes_in_use'], 1e9, 2)} GB", flush=True)
        if "decode_trace" in run:
            print(run["decode_trace"]["summary"], flush=True)
    print(f"wrote {json_path} and appended {len(args.batch)} rows to {args.results_md}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
