"""gptoss_jax.random_weights: a random model drawn part by part, with GptOss's structure."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.checkpoints.parameters import abstract_model
from gptoss_jax.config import preset
from gptoss_jax.generate import generate
from gptoss_jax.random_weights import PART_KINDS, part_initializer, parts, random_model


def _flat(model) -> dict[str, jax.Array]:
    return {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def config():
    return dataclasses.replace(preset("tiny"), num_hidden_layers=3)


def test_it_has_the_models_parameters_and_is_set_by_its_seed(config):
    model = random_model(config, seed=1, dtype=jnp.float32, kernels="xla")
    parameters, expected = _flat(model), _flat(abstract_model(config, kernels="xla"))
    assert {path: (a.shape, a.dtype) for path, a in parameters.items()} == {
        path: (a.shape, a.dtype) for path, a in expected.items()}
    assert model.dtype == jnp.float32 and model.kernels == "xla"

    again, other = _flat(random_model(config, seed=1)), _flat(random_model(config, seed=2))
    assert all(np.array_equal(parameters[path], again[path]) for path in parameters)
    drawn = [path for path in parameters if not path.endswith(("norm.scale", ".scales"))]
    assert all(not np.array_equal(parameters[path], other[path]) for path in drawn)
    # Every part is drawn with a key of its own: no two layers alike.
    assert not np.array_equal(parameters["block.0.mlp.mlp1_weight.blocks"], parameters["block.2.mlp.mlp1_weight.blocks"])
    assert not np.array_equal(parameters["embedding.weight"], parameters["unembedding.weight"])

    blocks = np.asarray(parameters["block.1.mlp.mlp2_weight.blocks"])
    assert len(np.unique(blocks)) == 256  # every byte value, so every FP4 code in both nibbles
    weight = np.asarray(parameters["embedding.weight"], np.float32)
    assert abs(weight.std() - 0.02) < 0.002 and abs(weight.mean()) < 0.002

    tokens = generate(model, [[1, 2, 3]], max_new_tokens=3, temperature=0).tokens
    assert len(tokens[0]) == 3


def test_blocks_of_one_kind_share_one_program(config):
    assert [kind for _, kind in parts(config)] == [
        "embedding", "sliding block", "full block", "sliding block", "norm", "unembedding"]
    part_initializer.cache_clear()
    random_model(config)
    assert part_initializer.cache_info().misses == len(PART_KINDS)
    with pytest.raises(ValueError, match="unknown kind of part 'head'"):
        part_initializer(config, "head")


def test_large_weights_are_drawn_in_pieces_with_one_pieces_temporaries():
    """A whole-vocabulary table drawn at once takes 16 bytes an element of temporaries."""
    config = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=1)
    stats = part_initializer(config, "embedding").lower(jax.random.key(0)).compile().memory_analysis()
    assert stats.output_size_in_bytes == config.vocab_size * config.hidden_size * 2
    assert stats.temp_size_in_bytes < 0.05 * stats.output_size_in_bytes
