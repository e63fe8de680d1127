"""On-device parameter bytes of gpt-oss-20b and gpt-oss-120b, from shapes alone.

The model is built abstractly with ``nnx.eval_shape``: nothing is allocated and no weights are
needed, so this runs anywhere. The goals (design.md) leave room for a KV cache: 20b under
14 GB (a 16 GB card) and 120b under 66 GB (one 80 GB H100).

    python benchmarks/memory.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.config import preset
from gptoss_jax.model import GptOss

GOALS_GB = {"gpt-oss-20b": 14.0, "gpt-oss-120b": 66.0}


def parameter_bytes(name: str) -> dict[str, int]:
    """Bytes of each kind of parameter of a preset: MXFP4 experts, expert biases, the rest."""
    abstract = nnx.eval_shape(lambda: GptOss(preset(name), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    totals: dict[str, int] = defaultdict(int)
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        leaf = variable.get_value()
        size = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        key = ".".join(map(str, path))
        if key.endswith((".blocks", ".scales")):
            totals["experts (MXFP4 blocks + scales)"] += size
        elif key.endswith(("mlp1_bias", "mlp2_bias")):
            totals["expert biases (bf16)"] += size
        elif key.startswith(("embedding", "unembedding")):
            totals["embedding + unembedding (bf16)"] += size
        else:
            totals["attention, router, norms"] += size
    return dict(totals)


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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
