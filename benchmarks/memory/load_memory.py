"""Peak memory of ``gptoss_jax.load`` at gpt-oss-120b's per-layer shapes, from each kind of folder.

A random model with the preset's shapes and ``--layers`` layers (2 by default: a sliding and a
full one, 5.8 GB at 120b's shapes) is written as a Hugging Face checkpoint in shards of at most
``--shard-gb`` (the public folders use about 4 GB) and converted (``gptoss-jax convert``); with
``--folders hf-bf16``, also as a fine-tune saves it, the experts dense in bfloat16 (15 GB at
120b's shapes), which loading quantizes to MXFP4. Each folder is then loaded in a fresh process,
which reports:

* the parameter bytes and the largest tensor's;
* its peak resident memory over its resident memory just before loading (``ru_maxrss``
  against ``/proc/self/status``), which on the CPU holds the device's arrays as well as the
  host's: loading one tensor at a time, it should be the parameters plus about two tensors (one
  read on the host, one placed);
* the device bytes held once loaded (``jax.live_arrays``), which should be the parameters.

On a GPU the same run separates the two: device bytes from ``memory_stats()``'s peak, host
memory from the peak resident memory.

    python -m benchmarks.memory.load_memory [--model gpt-oss-120b] [--layers 2] [--folders hf,converted,hf-bf16]
                                            [--folder DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


def _resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(folder: Path) -> dict:
    """Load ``folder`` in this process; its memory figures (see the module docstring)."""
    import jax
    from flax import nnx

    import gptoss_jax
    from gptoss_jax.checkpoints.parameters import parameter_specs
    from gptoss_jax.footprint import parameter_bytes

    jax.devices()  # start the backend before the baseline
    before = _resident_bytes()
    start = time.perf_counter()
    model = gptoss_jax.load(folder, kernels="xla")
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = model.config
    specs = parameter_specs(config)
    return {
        "folder": str(folder),
        "parameter_bytes": sum(parameter_bytes(config).values()),
        "largest_tensor_bytes": max(spec.size * spec.dtype.itemsize for spec in specs.values()),
        "peak_resident_over_baseline_bytes": peak - before,
        "device_bytes_loaded": sum(array.nbytes for array in jax.live_arrays()),
        "bytes_on_disk": sum(file.stat().st_size for file in folder.rglob("*") if file.is_file()),
        "load_seconds": seconds,
    }


FOLDER_KINDS = {"hf": "hugging face", "converted": "converted", "hf-bf16": "hugging face, bf16 experts"}


def write_checkpoints(model_name: str, layers: int, folder: Path, shard_bytes: int, kinds: list[str]) -> dict[str, Path]:
    """A random model's folders of ``kinds`` (:data:`FOLDER_KINDS`) under ``folder``, by kind."""
    import ml_dtypes

    from gptoss_jax.checkpoints.layouts import Layout
    from gptoss_jax.checkpoints.orbax_writer import ConversionWarning, convert_checkpoint
    from gptoss_jax.checkpoints.safetensors_writer import write_parameters
    from gptoss_jax.config import preset
    from gptoss_jax.random_weights import random_parameters

    config = dataclasses.replace(preset(model_name), num_hidden_layers=layers)
    folders = {kind: folder / kind for kind in kinds}
    # Streamed part by part: only the bf16 folder's largest tensor (4.2 GB at 120b) is ever whole.
    if ("hf" in kinds or "converted" in kinds) and not (folder / "hf").exists():
        write_parameters(config, random_parameters(config), folder / "hf", Layout.HF, max_shard_bytes=shard_bytes)
    if "converted" in kinds and not folders["converted"].exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConversionWarning)  # a random model has no tokenizer to copy
            convert_checkpoint(folder / "hf", folders["converted"], progress=False)
    if "hf-bf16" in kinds and not folders["hf-bf16"].exists():
        write_parameters(config, random_parameters(config), folders["hf-bf16"], Layout.HF,
                         max_shard_bytes=shard_bytes, dense_experts=ml_dtypes.bfloat16)
    return folders


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt-oss-120b", choices=["gpt-oss-20b", "gpt-oss-120b", "small", "tiny"])
    parser.add_argument("--layers", type=int, default=2, help="layers of the written model (default 2)")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="largest safetensors shard (default 4)")
    parser.add_argument("--folders", default="hf,converted",
                        help=f"the kinds of folder to load, of {', '.join(FOLDER_KINDS)}; hf-bf16: the experts "
                             "dense in bfloat16, as a fine-tune saves them (default: hf,converted)")
    parser.add_argument("--folder", type=Path,
                        help="where to write the checkpoints, reused if there (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--measure", type=Path, metavar="DIR", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.layers < 1 or args.shard_gb <= 0:
        parser.error("--layers and --shard-gb must be positive")
    args.folders = args.folders.split(",")
    if not args.folders or set(args.folders) - set(FOLDER_KINDS):
        parser.error(f"--folders takes kinds of {', '.join(FOLDER_KINDS)}, comma-separated")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return {}
    with tempfile.TemporaryDirectory(prefix="load-memory-") as scratch:
        folder = args.folder or Path(scratch)
        print(f"writing a {args.layers}-layer {args.model} in {folder} ...", flush=True)
        folders = write_checkpoints(args.model, args.layers, folder, int(args.shard_gb * 1e9), args.folders)
        report = {}
        for name, path in folders.items():
            kind = FOLDER_KINDS[name]
            result = subprocess.run([sys.executable, "-m", "benchmarks.memory.load_memory", "--measure", str(path)],
                                    cwd=REPOSITORY, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise SystemExit(f"loading {path} failed:\n{result.stderr[-3000:]}")
            figures = report[kind] = json.loads(result.stdout.splitlines()[-1])
            over = figures["peak_resident_over_baseline_bytes"] - figures["parameter_bytes"]
            print(f"{kind}: parameters {figures['parameter_bytes'] / 1e9:.2f} GB, largest tensor "
                  f"{figures['largest_tensor_bytes'] / 1e9:.2f} GB; peak resident memory over the baseline "
                  f"{figures['peak_resident_over_baseline_bytes'] / 1e9:.2f} GB = parameters + "
                  f"{over / figures['largest_tensor_bytes']:.2f} largest tensors; device bytes once loaded "
                  f"{figures['device_bytes_loaded'] / 1e9:.2f} GB; {figures['bytes_on_disk'] / 1e9:.2f} GB on disk "
                  f"loaded in {figures['load_seconds']:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
