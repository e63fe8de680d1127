"""On-device parameter bytes of gpt-oss-20b and gpt-oss-120b, from shapes alone.

The model is built abstractly with ``nnx.eval_shape``: nothing is allocated and no weights are
needed, so this runs anywhere. The goals leave room for a KV cache: 20b under
14 GB (a 16 GB card) and 120b under 66 GB (one 80 GB H100). Per-device bytes on 1, 2, 4 and 8
GPUs follow from the partition rules of ``gptoss_jax.sharding`` on the default mesh: each
parameter's shard shape is its shape divided by the mesh axes its PartitionSpec names.

    python benchmarks/memory.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

from gptoss_jax import footprint
from gptoss_jax.config import preset
from gptoss_jax.sharding import AXES, default_mesh_shape

DEVICE_COUNTS = (1, 2, 4, 8)

GOALS_GB = {"gpt-oss-20b": 14.0, "gpt-oss-120b": 66.0}


def parameter_bytes(name: str) -> dict[str, int]:
    """Bytes of each kind of parameter of a preset: :func:`gptoss_jax.footprint.parameter_bytes`."""
    return footprint.parameter_bytes(preset(name))


def per_device_bytes(name: str, mesh_shape: dict[str, int]) -> int:
    """Parameter bytes one device holds on a mesh of these axis sizes (the largest shard, if uneven)."""
    return footprint.per_device_parameter_bytes(preset(name), mesh_shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    report = {}
    for name, goal in GOALS_GB.items():
        parts = parameter_bytes(name)
        total = sum(parts.values())
        report[name] = {"parts": parts, "total_bytes": total, "goal_gb": goal}
        print(f"{name}: {total / 1e9:.2f} GB of parameters on device (goal < {goal:g} GB: "
              f"{'met' if total / 1e9 < goal else 'MISSED'})")
        for part, size in parts.items():
            print(f"  {part:34s} {size / 1e9:7.2f} GB")
        report[name]["per_device_bytes"] = {}
        for count in DEVICE_COUNTS:
            shape = default_mesh_shape(count, preset(name))
            per_device = per_device_bytes(name, shape)
            report[name]["per_device_bytes"][count] = per_device
            mesh = ",".join(f"{axis}={shape[axis]}" for axis in AXES)
            print(f"  on {count} GPU{'s' if count > 1 else ' '} ({mesh}): {per_device / 1e9:7.2f} GB per device")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
