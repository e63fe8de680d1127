"""Which kernel runs each part of gpt-oss on each mesh, at the per-device shapes, lowered on the CPU.

Under a mesh the model calls the Pallas kernels inside ``shard_map``, so each device's kernels
see a shard's problem: ``expert x tensor`` times fewer experts, ``tensor`` times fewer query and
KV heads (whole KV groups, so 8 query heads per KV head stay), ``data`` times fewer batch rows.
This exports a two-layer model (one sliding-window and one full-attention layer: every kind of
layer) of gpt-oss-20b's and gpt-oss-120b's widths with ``kernels="pallas"`` for ``cuda`` on CPU
devices, with abstract, sharded parameters (nothing is allocated), for a decode step (the
decode-attention kernel) and a prompt's first chunk (the flash-attention kernel), and reports
every kernel call with its operand shapes and the module's Mosaic GPU custom calls.

  python -m benchmarks.kernels.sharded_kernels [--json]

It needs 8 devices; without ``XLA_FLAGS`` set it asks the CPU for them. The meshes
(:func:`meshes`) are the default ones (:func:`gptoss_jax.sharding.default_mesh_shape`) on 2, 4
and 8 devices and the examples that ``docs/multi-gpu.md``, the CLI's help and the sharding module
give. The table it prints is ``docs/multi-gpu.md``'s; ``tests/test_sharded_lowering.py`` runs it and
checks both. :func:`shard_config` is the config with one device's sizes, from which
:mod:`benchmarks.kernels.kernel_sass` builds its per-shard cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

DEVICES = 8
MODELS = ("gpt-oss-20b", "gpt-oss-120b")
DEVICE_COUNTS = (2, 4, 8)
# The mesh examples the project documents: the sharding module's and `env --mesh`'s, docs/multi-gpu.md's
# two processes', the CLI's --mesh help's (docs/multi-gpu.md's one process), and the one tests/test_sharding.py
# runs with data.
DOCUMENTED_MESHES = ("expert=2,tensor=4", "expert=2,tensor=2", "data=1,expert=4,tensor=2", "data=2,expert=2,tensor=2")
LOWERED_LAYERS = 2  # layer 0 slides, layer 1 attends to all
DECODE_BATCH = 64
CACHE_POSITIONS = 4096
PREFILL_TOKENS = 4096  # per prompt; one prompt per data shard
KERNEL_FUNCTIONS = {"decode_attention": "decode_attention", "flash_attention": "prefill_attention",
                    "mxfp4_grouped_matmul": "experts"}
"""The jitted kernel entry points, by the part of the model they run."""
KERNEL_PRIMITIVES = ("pallas_call", "mpmd_map")  # what a Pallas kernel call is in a jaxpr
_MOSAIC_CALL = re.compile(r"stablehlo\.custom_call @mosaic_gpu\w*\(")


def meshes() -> list[dict[str, int]]:
    """The meshes checked, as axis sizes: the defaults on 2, 4 and 8 devices, then the documented ones."""
    from gptoss_jax.sharding import default_mesh_shape, parse_mesh_spec

    sizes = [default_mesh_shape(count) for count in DEVICE_COUNTS]
    sizes += [parse_mesh_spec(spec) for spec in DOCUMENTED_MESHES]
    return [s for i, s in enumerate(sizes) if s not in sizes[:i]]


def mesh_label(sizes: Mapping[str, int]) -> str:
    """``expert=2,tensor=4``: the axes larger than 1, as the CLI's ``--mesh`` takes them."""
    return ",".join(f"{axis}={size}" for axis, size in sizes.items() if size > 1) or "data=1"


def shard_config(config: Any, sizes: Mapping[str, int]) -> Any:
    """``config`` with one device's share: experts over ``expert x tensor``, heads over ``tensor``.

    The vocabulary and the batch rows are split too, but no kernel reads the vocabulary, and the
    rows are a call's, not the config's.
    """
    tensor = sizes["tensor"]
    return dataclasses.replace(
        config, num_experts=config.num_experts // (sizes["expert"] * tensor),
        num_attention_heads=config.num_attention_heads // tensor,
        num_key_value_heads=config.num_key_value_heads // tensor,
    )


def step_batch(step: str, sizes: Mapping[str, int]) -> int:
    """The batch of a step on a mesh: 64 decode rows, one prompt per data shard."""
    return DECODE_BATCH if step == "decode" else sizes["data"]


def lower(model: str, sizes: Mapping[str, int], step: str) -> dict[str, Any]:
    """Export a two-layer ``model`` step on a mesh of ``sizes`` for ``cuda``; report its kernels.

    Args:
      model: a preset name.
      sizes: the mesh's axis sizes; its devices are the first of ``jax.devices()``.
      step: ``decode`` (one token per row against a cache of :data:`CACHE_POSITIONS`) or
        ``prefill`` (a prompt's first :data:`PREFILL_TOKENS` tokens into an empty cache).

    Returns:
      ``{"plan": {part: implementation}, "calls": [{"function", "part", "shapes",
      "kernels_inside"}, ...], "mosaic_calls": int}``: the kernel plan, every kernel call in
      program order with its operands' per-device shapes and the Pallas kernels it holds, and
      the exported module's Mosaic GPU custom calls (one per distinct call: identical calls
      share a lowered function).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gptoss_jax.config import preset
    from gptoss_jax.kernel_dispatch import kernel_plan
    from gptoss_jax.kv_cache import KVCache
    from gptoss_jax.model import GptOss
    from gptoss_jax.sharding import BATCH, HEADS, make_mesh, named_sharding, parameter_shardings

    config = dataclasses.replace(preset(model), num_hidden_layers=LOWERED_LAYERS)
    mesh = make_mesh(sizes, jax.devices()[:math.prod(sizes.values())])
    abstract = nnx.eval_shape(lambda: GptOss(config, kernels="pallas", mesh=mesh, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                         state, parameter_shardings(state, mesh))
    batch = step_batch(step, sizes)
    length = 1 if step == "decode" else PREFILL_TOKENS
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=named_sharding(mesh, BATCH, None))
    cache = jax.eval_shape(lambda: KVCache.create(config, batch, CACHE_POSITIONS))
    heads, rows = named_sharding(mesh, BATCH, None, HEADS, None), named_sharding(mesh, BATCH, None)
    cache = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                           sharding=heads if leaf.ndim == 4 else rows), cache)

    def run(state, tokens, positions, cache):
        return nnx.merge(graphdef, state).with_cache(tokens, positions, cache, cache_is_empty=step == "prefill")

    jitted = jax.jit(run)
    calls = list(_kernel_calls(jitted.trace(state, tokens, tokens, cache).jaxpr.jaxpr))
    module = jax.export.export(jitted, platforms=["cuda"])(state, tokens, tokens, cache).mlir_module()
    plan = kernel_plan("pallas", config, jnp.bfloat16)
    return {"plan": dataclasses.asdict(plan), "calls": calls, "mosaic_calls": len(_MOSAIC_CALL.findall(module))}


def _kernel_calls(jaxpr: Any) -> Iterator[dict[str, Any]]:
    """Each call of a kernel function in ``jaxpr`` (shard_map bodies included), in program order."""
    for equation in jaxpr.eqns:
        name = equation.params.get("name")
        if equation.primitive.name == "jit" and name in KERNEL_FUNCTIONS:
            inner = equation.params["jaxpr"].jaxpr
            yield {"function": name, "part": KERNEL_FUNCTIONS[name],
                   "shapes": [list(v.aval.shape) for v in equation.invars],
                   "kernels_inside": sum(1 for _ in _primitives(inner, KERNEL_PRIMITIVES))}
        else:
            for sub in sub_jaxprs(equation):
                yield from _kernel_calls(sub)


def _primitives(jaxpr: Any, names: tuple[str, ...]) -> Iterator[Any]:
    for equation in jaxpr.eqns:
        if equation.primitive.name in names:
            yield equation
        for sub in sub_jaxprs(equation):
            yield from _primitives(sub, names)


def sub_jaxprs(equation: Any) -> Iterator[Any]:
    """The jaxprs nested in one equation's parameters (a jit's, a shard_map's, a loop's bodies)."""
    from jax.extend import core as jax_core

    for value in equation.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax_core.Jaxpr):
                yield item


def report() -> list[dict[str, Any]]:
    """:func:`lower` for every model, mesh and step, with the model, mesh and step in each entry."""
    return [dict(model=model, mesh=sizes, step=step, **lower(model, sizes, step))
            for sizes in meshes() for model in MODELS for step in ("decode", "prefill")]


def table(entries: list[dict[str, Any]]) -> str:
    """docs/multi-gpu.md's table: per mesh, each device's share as its kernel calls saw it, and the
    kernels that ran attention and the experts (XLA, and for which steps, where none did)."""
    rows = [f"| mesh | devices | per device: query / KV heads | decode rows (of {DECODE_BATCH}) | experts (20b / 120b) "
            "| attention | expert matmuls |", "|---" * 7 + "|"]
    for sizes in meshes():
        mine = [e for e in entries if e["mesh"] == sizes]
        decode = next(e for e in mine if e["step"] == "decode")
        q, k = _first_call(decode, "decode_attention")["shapes"][:2]
        experts = " / ".join(str(_first_call(e, "experts")["shapes"][1][0]) for model in MODELS
                             for e in mine if e["model"] == model and e["step"] == "decode")

        def kernels(*parts: str) -> str:
            names = sorted({c["function"] for e in mine for c in e["calls"] if c["part"] in parts})
            on_xla = sorted({e["step"] for e in mine for part in parts if e["plan"][part] == "xla"})
            return ", ".join([f"`{n}`" for n in names] + [f"XLA ({', '.join(on_xla)})"] * bool(on_xla))

        rows.append(f"| `{mesh_label(sizes)}` | {math.prod(sizes.values())} | {q[2]} / {k[2]} | {q[0]} | {experts} "
                    f"| {kernels('prefill_attention', 'decode_attention')} | {kernels('experts')} |")
    return "\n".join(rows) + "\n"


def _first_call(entry: dict[str, Any], part: str) -> dict[str, Any]:
    return next(c for c in entry["calls"] if c["part"] == part)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print every lowering's report as JSON instead")
    args = parser.parse_args(argv)
    entries = report()
    print(json.dumps(entries) if args.json else table(entries), end="")


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(sys.argv[1:])
