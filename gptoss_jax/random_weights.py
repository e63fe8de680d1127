"""A model with random weights at any size, drawn on its devices one part at a time.

Traced as one program, ``GptOss(config, rngs=...)`` at gpt-oss-20b's size needs 92 GB of
temporaries for 13.8 GB of weights, XLA being free to run every draw at once.
:func:`random_model` draws the parts one after the other instead (the embedding, each block, the
final norm, the unembedding), each by a jitted program that returns that part's parameters
placed by the mesh's partition rules (each device draws only its shards). The parts go to
:func:`gptoss_jax.checkpoints.parameters.build_model` as a checkpoint's tensors would, so the
weights never pass through the host and are never held twice: the peak is the parameters plus
one part's temporaries, which the model's initializers keep small by drawing in pieces.

Blocks of one kind (sliding or full attention) share a program, the part's key being its
argument: a model compiles five small programs, whatever its depth.

Example::

    from gptoss_jax.random_weights import random_model
    model = random_model(preset("gpt-oss-120b"), seed=0)   # 65 GB, made on the default device
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.checkpoints.parameters import build_model, parameter_shardings
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernel_dispatch import KernelChoice
from gptoss_jax.model import Embedding, GptOss, Linear, RMSNorm, TransformerBlock
from gptoss_jax.sharding import VOCAB

# The kinds of part, by the module that makes one; a block's kind names a layer of that kind.
_MAKERS: dict[str, Callable[[GptOssConfig, nnx.Rngs], nnx.Module]] = {
    "embedding": lambda config, rngs: Embedding(config.vocab_size, config.hidden_size, rngs=rngs),
    "sliding block": lambda config, rngs: TransformerBlock(config, 0, rngs=rngs),
    "full block": lambda config, rngs: TransformerBlock(config, 1, rngs=rngs),
    "norm": lambda config, rngs: RMSNorm(config.hidden_size, config.rms_norm_eps),
    "unembedding": lambda config, rngs: Linear(config.hidden_size, config.vocab_size, use_bias=False,
                                               out_axis=VOCAB, rngs=rngs),
}
PART_KINDS = tuple(_MAKERS)


def parts(config: GptOssConfig) -> list[tuple[str, str]]:
    """``(parameter-path prefix, kind)`` of every part, in the model's order: ``("block.3", "full block")``."""
    blocks = [(f"block.{layer}", "sliding block" if config.is_sliding(layer) else "full block")
              for layer in range(config.num_hidden_layers)]
    return [("embedding", "embedding"), *blocks, ("norm", "norm"), ("unembedding", "unembedding")]


@functools.lru_cache(maxsize=32)
def part_initializer(config: GptOssConfig, kind: str, mesh: jax.sharding.Mesh | None = None) -> jax.stages.Wrapped:
    """The jitted program of one kind of part: ``key -> {parameter path within the part: array}``.

    The arrays are placed by the mesh's partition rules when a mesh is given.
    """
    if kind not in _MAKERS:
        raise ValueError(f"unknown kind of part {kind!r}; the kinds are {PART_KINDS}")

    def draw(key: jax.Array) -> dict[str, jax.Array]:
        module = _MAKERS[kind](config, nnx.Rngs(params=key))
        return {".".join(map(str, path)): variable.get_value()
                for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param))}

    if mesh is None:
        return jax.jit(draw)
    prefix = dict((part_kind, name) for name, part_kind in parts(config))[kind] + "."
    shardings = {path[len(prefix):]: sharding for path, sharding in parameter_shardings(config, mesh).items()
                 if path.startswith(prefix)}
    return jax.jit(draw, out_shardings=shardings)


def random_parameters(config: GptOssConfig, *, seed: int = 0,
                      mesh: jax.sharding.Mesh | None = None) -> Iterator[tuple[str, jax.Array]]:
    """``(parameter path, array)`` of a random model, one part's worth on the devices at a time."""
    key = jax.random.key(seed)
    for index, (name, kind) in enumerate(parts(config)):
        for path, array in part_initializer(config, kind, mesh)(jax.random.fold_in(key, index)).items():
            yield f"{name}.{path}", array


def random_model(
    config: GptOssConfig, *, seed: int = 0, dtype: jnp.dtype = jnp.bfloat16, kernels: KernelChoice = "auto",
    mesh: jax.sharding.Mesh | None = None, progress: bool = False,
) -> GptOss:
    """A ``GptOss`` with random weights, drawn on its devices part by part.

    Args:
      config: the model's shapes.
      seed: the same seed gives the same weights.
      dtype: the compute dtype.
      kernels: what runs attention and the experts (see :class:`gptoss_jax.model.GptOss`).
      mesh: place the parameters on it, as :func:`gptoss_jax.load` does; None: the default device.
      progress: draw a progress bar on stderr when it is a terminal.
    """
    return build_model(config, random_parameters(config, seed=seed, mesh=mesh), dtype=dtype, kernels=kernels,
                       mesh=mesh, progress=progress)
