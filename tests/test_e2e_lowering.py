"""The big shapes lower for CUDA with the Pallas kernels in place, on the CPU, with no weights.

Cases: gpt-oss-120b's decode step (one token per row, batch 1 and 64, a 4096-position KV cache),
gpt-oss-20b's 4096-token prefill (the cacheless forward, which runs the flash-attention kernel)
and a later 512-token prefill chunk against the cache (the decode-attention kernel), with ``kernels="pallas"`` forced and abstract weights (``nnx.eval_shape``, split into
ShapeDtypeStructs: nothing is allocated).

Exporting every layer would make CI slow for no gain, so each case (1) traces the full-depth step
and collects its kernel calls, three per layer (attention, the two expert matmuls); (2) exports a
model of the same widths with two layers (one sliding-window, one full-attention layer: every
kind there is) for ``cuda`` and checks the module holds a Mosaic GPU custom call for each
distinct kernel call (the kernels are jitted, so identical calls share one lowered function);
(3) checks that the full-depth kernel calls are exactly those the
two-layer export lowered, parameters and kernel bodies alike: the kernels do not depend on the
layer count, so the full-depth step lowers as well.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.extend import core as jax_core

from benchmarks.kernels.sharded_kernels import KERNEL_PRIMITIVES, sub_jaxprs
from gptoss_jax.config import GptOssConfig, preset
from gptoss_jax.kv_cache import KVCache
from gptoss_jax.model import GptOss

CACHE_POSITIONS = 4096
PREFILL_TOKENS = 4096
CHUNK_TOKENS = 512
KERNELS_PER_LAYER = 3  # attention, expert matmul 1 (bias + SwiGLU), expert matmul 2
LOWERED_LAYERS = 2  # layer 0 slides, layer 1 attends to all: both kinds of layer


def abstract_step(config: GptOssConfig, mode: str, batch: int) -> tuple[Callable, tuple]:
    """A jittable step of a ``kernels="pallas"`` model and ShapeDtypeStruct arguments for it.

    ``decode`` and ``chunk``: ``with_cache`` on int32 tokens and positions ``[batch, 1]`` or
    ``[batch, CHUNK_TOKENS]`` and a cache of :data:`CACHE_POSITIONS`. ``prefill``: the forward
    pass on tokens ``[batch, PREFILL_TOKENS]``.
    """
    abstract_model = nnx.eval_shape(lambda: GptOss(config, kernels="pallas", rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    if mode in ("decode", "chunk"):
        tokens = jax.ShapeDtypeStruct((batch, 1 if mode == "decode" else CHUNK_TOKENS), jnp.int32)
        cache = jax.eval_shape(lambda: KVCache.create(config, batch, CACHE_POSITIONS))

        def decode_step(state, tokens, positions, cache):
            return nnx.merge(graphdef, state).with_cache(tokens, positions, cache)

        return decode_step, (abstract_state, tokens, tokens, cache)

    def prefill(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    return prefill, (abstract_state, jax.ShapeDtypeStruct((batch, PREFILL_TOKENS), jnp.int32))


def kernel_calls(jaxpr: jax_core.Jaxpr) -> list[str]:
    """Every Pallas kernel call in a jaxpr, nested ones included, as the text of its parameters
    (grid, memory spaces, the kernel body), in program order."""
    calls = []
    for equation in jaxpr.eqns:
        if equation.primitive.name in KERNEL_PRIMITIVES:
            calls.append(str(equation.params))
        else:
            for sub in sub_jaxprs(equation):
                calls.extend(kernel_calls(sub))
    return calls


def traced_kernel_calls(config: GptOssConfig, mode: str, batch: int) -> list[str]:
    step, arguments = abstract_step(config, mode, batch)
    return kernel_calls(jax.jit(step).trace(*arguments).jaxpr.jaxpr)


@pytest.mark.parametrize(
    "model, mode, batch",
    [
        ("gpt-oss-120b", "decode", 1), ("gpt-oss-120b", "decode", 64), ("gpt-oss-20b", "prefill", 1),
        ("gpt-oss-20b", "chunk", 8),
    ],
)
def test_lowers_for_cuda_with_the_kernels(model, mode, batch):
    full_config = preset(model)
    full_depth_calls = traced_kernel_calls(full_config, mode, batch)
    assert len(full_depth_calls) == KERNELS_PER_LAYER * full_config.num_hidden_layers

    lowered_config = dataclasses.replace(full_config, num_hidden_layers=LOWERED_LAYERS)
    lowered_calls = traced_kernel_calls(lowered_config, mode, batch)
    step, arguments = abstract_step(lowered_config, mode, batch)
    exported = jax.export.export(jax.jit(step), platforms=["cuda"])(*arguments)
    module = exported.mlir_module()
    mosaic_calls = re.findall(r"stablehlo\.custom_call @mosaic_gpu\w*\(", module)
    assert len(lowered_calls) == KERNELS_PER_LAYER * LOWERED_LAYERS
    assert len(mosaic_calls) == len(set(lowered_calls))
    assert exported.platforms == ("cuda",)

    # Each of the two layers' kernels lowered above; the full depth repeats them and nothing else.
    assert set(full_depth_calls) == set(lowered_calls)
    assert full_depth_calls[:len(lowered_calls)] == lowered_calls

    vocab = full_config.vocab_size
    tokens = {"decode": 1, "chunk": CHUNK_TOKENS, "prefill": PREFILL_TOKENS}[mode]
    assert exported.out_avals[0].shape == (batch, tokens, vocab)
