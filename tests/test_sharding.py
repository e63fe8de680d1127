"""Sharding on a device mesh: parity with one device, the partition rules, loading, multi-process.

JAX fixes its device count when it starts, and the rest of the suite runs on one CPU device, so
the checks that need 8 devices run in a subprocess (this file run as a script, with
``--xla_force_host_platform_device_count=8``) that reports its results as JSON; the tests here
assert on them. Two more processes, joined with ``jax.distributed`` over localhost, run the
multi-process forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MESHES = ("data=1", "expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2")
EXPERTS_SPLIT = ["expert", "tensor"]  # as JSON gives it back
# What the rules must give each parameter, by the end of its path (all None: replicated).
EXPECTED_SPECS = {
    "embedding.weight": [EXPERTS_SPLIT, None],
    "unembedding.weight": [EXPERTS_SPLIT, None],
    "attn.qkv.weight": ["tensor", None],
    "attn.qkv.bias": ["tensor"],
    "attn.sinks": ["tensor"],
    "attn.out.weight": [None, "tensor"],
    "blocks": [EXPERTS_SPLIT, None, None, None],
    "scales": [EXPERTS_SPLIT, None, None],
    "mlp1_bias": [EXPERTS_SPLIT, None],
    "mlp2_bias": [EXPERTS_SPLIT, None],
    "attn.out.bias": [None],
    "norm.scale": [None],
    "mlp.gate.weight": [None, None],
    "mlp.gate.bias": [None],
}


def _python_env(device_count: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw original/ checkpoint of the test config, written on one device."""
    import jax.numpy as jnp
    from flax import nnx

    from gptoss_jax.checkpoints.layouts import Layout
    from gptoss_jax.checkpoints.safetensors_writer import write_checkpoint
    from gptoss_jax.model import GptOss

    model = GptOss(test_config(), dtype=jnp.float32, kernels="xla", rngs=nnx.Rngs(0))
    return write_checkpoint(model, tmp_path_factory.mktemp("sharding") / "original", Layout.ORIGINAL)


@pytest.fixture(scope="module")
def worker(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The 8-device checks' results."""
    converted = tmp_path_factory.mktemp("converted") / "converted"
    result = subprocess.run(
        [sys.executable, __file__, "worker", str(checkpoint), str(converted)],
        env=_python_env(8), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_logits_match_one_device(worker: dict, mesh: str):
    assert worker["logits_error"][mesh] < 1e-4


@pytest.mark.parametrize("mesh", ["expert=4,tensor=2", "data=2,expert=2,tensor=2"])
def test_greedy_generation_matches_one_device(worker: dict, mesh: str):
    """On the second mesh the KV cache also grows from 8 to 16 slots midway."""
    assert worker["tokens"][mesh] == worker["tokens"]["single"]
    assert len(worker["tokens"]["single"][0]) == 10


def test_every_parameter_is_sharded_by_the_rules(worker: dict):
    specs = worker["parameter_specs"]
    assert len(specs) == 2 + 1 + 2 * 15  # embedding, unembedding, final norm, 15 per layer
    for path, (spec, shard_shape, shape) in specs.items():
        suffix = next(s for s in EXPECTED_SPECS if path.endswith(s))
        assert spec == EXPECTED_SPECS[suffix], path
        # On data=2, expert=2, tensor=2: the experts' and vocabulary's split is 4 ways.
        splits = [{None: 1, "tensor": 2}[axis] if not isinstance(axis, list) else 4 for axis in spec]
        splits += [1] * (len(shape) - len(splits))
        assert shard_shape == [size // split for size, split in zip(shape, splits)], path


def test_a_random_model_is_drawn_in_place_on_the_mesh(worker: dict):
    assert worker["random_model"] == {"same values": True, "placed by the rules": True}


def test_kv_cache_is_split_by_heads_and_rows(worker: dict):
    assert worker["cache_specs"] == [["data", None, "tensor", None], ["data", None, "tensor", None], ["data", None]]
    assert worker["extended_cache_specs"] == worker["cache_specs"]


@pytest.mark.parametrize("source", ["raw", "converted"])
def test_sharded_loading(worker: dict, source: str):
    assert worker["load_error"][source] < 1e-4
    assert worker["load_specs"][source] == [EXPERTS_SPLIT, None, None, None]


def test_bad_meshes_are_refused_clearly(worker: dict):
    assert worker["errors"] == {
        "expert=3": "mesh data=1, expert=3, tensor=1 needs 3 devices, but there are 8; give sizes whose product "
                    "is 8, or leave the mesh out (the default spans every device)",
        "tensor=8": "the model's 4 KV heads do not divide over the mesh's tensor = 8 devices",
        "experts": "the model's 12 experts do not divide over the mesh's expert x tensor = 8 devices",
    }


def test_mesh_spec_parsing():
    from gptoss_jax.sharding import MeshError, parse_mesh_spec

    assert parse_mesh_spec("expert=4, tensor=2") == {"data": 1, "expert": 4, "tensor": 2}
    assert parse_mesh_spec({"data": 2}) == {"data": 2, "expert": 1, "tensor": 1}
    for spec, message in [("pipeline=2", "unknown mesh axes ['pipeline']"), ("expert=two", "expected items like"),
                          ("tensor=0", "must be a positive integer"), ("tensor=2,tensor=2", "given twice")]:
        with pytest.raises(MeshError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_mesh_spec(spec)


@pytest.mark.parametrize(
    ("model", "device_count", "expected"),
    [
        ("gpt-oss-20b", 8, (1, 1, 8)),
        ("gpt-oss-20b", 16, (1, 2, 8)),
        ("gpt-oss-20b", 64, (2, 4, 8)),  # 32 experts: two copies of the model
        ("gpt-oss-120b", 64, (1, 8, 8)),
        ("gpt-oss-20b", 6, (3, 1, 2)),  # 3 divides no expert count: data takes it
        ("small", 4, (1, 2, 2)),  # the demo's 2 KV heads
        ("small", 8, (1, 4, 2)),
        ("tiny", 8, (2, 2, 2)),  # 4 experts
        (None, 16, (1, 2, 8)),  # no config: a mesh for both gpt-oss models
    ],
)
def test_default_mesh_follows_the_model(model: str | None, device_count: int, expected: tuple[int, int, int]):
    from gptoss_jax.config import preset
    from gptoss_jax.sharding import AXES, default_mesh_shape

    config = None if model is None else preset(model)
    assert tuple(default_mesh_shape(device_count, config)[axis] for axis in AXES) == expected


@pytest.mark.parametrize("model", ["gpt-oss-20b", "gpt-oss-120b", "small", "tiny"])
def test_default_mesh_always_fits(model: str):
    import math

    from gptoss_jax.config import preset
    from gptoss_jax.sharding import default_mesh_shape, mesh_misfits

    config = preset(model)
    for device_count in range(1, 257):
        sizes = default_mesh_shape(device_count, config)
        assert math.prod(sizes.values()) == device_count and mesh_misfits(sizes, config) == [], (device_count, sizes)


def test_two_processes_run_one_forward_pass(checkpoint: Path, tmp_path: Path):
    import jax.numpy as jnp
    import numpy as np

    import gptoss_jax

    port = _free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "process", str(checkpoint), str(tmp_path), str(port), str(index)],
            env=_python_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index in range(2)
    ]
    try:
        for process in processes:
            _, err = process.communicate(timeout=240)
            assert process.returncode == 0, err[-4000:]
    finally:
        for process in processes:
            process.kill()
    first, second = (np.load(tmp_path / f"logits{index}.npy") for index in range(2))
    np.testing.assert_array_equal(first, second)
    model = gptoss_jax.load(checkpoint, dtype=jnp.float32, kernels="xla")
    np.testing.assert_allclose(first, np.asarray(model(jnp.asarray(TOKENS))), atol=1e-4)


TOKENS = [[5, 17, 300, 2, 44, 9, 101, 7], [250, 3, 3, 80, 511, 0, 64, 12]]


def test_config():
    """Small, with 8 experts and 8 query / 4 KV heads so every test mesh divides them."""
    from gptoss_jax.config import preset

    return dataclasses.replace(preset("tiny"), num_experts=8, num_attention_heads=8, num_key_value_heads=4)


test_config.__test__ = False  # a helper, not a test


def _spec(sharding) -> list:
    return [list(axis) if isinstance(axis, tuple) else axis for axis in sharding.spec]


def _run_worker(checkpoint: str, converted: str) -> dict:
    import importlib

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import gptoss_jax
    from gptoss_jax.checkpoints.orbax_writer import convert_checkpoint
    from gptoss_jax.kv_cache import KVCache
    from gptoss_jax.model import GptOss
    from gptoss_jax.random_weights import random_model
    from gptoss_jax.sharding import MeshError, make_mesh

    config = test_config()
    tokens = jnp.asarray(TOKENS, jnp.int32)
    forward = jax.jit(lambda graphdef, state, tokens: nnx.merge(graphdef, state)(tokens), static_argnums=0)

    def logits(model: GptOss) -> np.ndarray:
        return np.asarray(forward(*nnx.split(model), tokens))

    def build(mesh_spec: str | None) -> GptOss:
        mesh = None
        if mesh_spec is not None:
            mesh = make_mesh(mesh_spec, jax.devices()[:1] if mesh_spec == "data=1" else None)
        return GptOss(config, dtype=jnp.float32, kernels="xla", mesh=mesh, rngs=nnx.Rngs(0))

    single = build(None)
    expected = logits(single)
    prompts = [TOKENS[0][:5], TOKENS[1][:3]]
    report: dict = {"logits_error": {}, "tokens": {}}
    report["tokens"]["single"] = gptoss_jax.generate(single, prompts, max_new_tokens=10, temperature=0).tokens
    for mesh_spec in MESHES:
        model = build(mesh_spec)
        report["logits_error"][mesh_spec] = float(np.max(np.abs(logits(model) - expected)))
        if mesh_spec == "data=2,expert=2,tensor=2":
            # On this mesh the cache starts at 8 slots and grows to 16 during generation.
            generation = importlib.import_module("gptoss_jax.generate")
            generation._MIN_CACHE, generation.FIRST_CACHE_LENGTH = 8, 1
        if mesh_spec in ("expert=4,tensor=2", "data=2,expert=2,tensor=2"):
            report["tokens"][mesh_spec] = gptoss_jax.generate(model, prompts, max_new_tokens=10, temperature=0).tokens
    report["parameter_specs"] = {
        ".".join(map(str, path)): (_spec(v.get_value().sharding), list(v.get_value().addressable_shards[0].data.shape),
                                   list(v.get_value().shape))
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    # A random model drawn on the mesh: each device draws its shards, the values those of one device.
    single_random = nnx.to_flat_state(nnx.state(random_model(config, seed=3, kernels="xla"), nnx.Param))
    sharded_random = nnx.to_flat_state(nnx.state(random_model(config, seed=3, kernels="xla", mesh=model.mesh),
                                                  nnx.Param))
    rules = {path: _spec(v.get_value().sharding) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    report["random_model"] = {
        "same values": all(np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
                           for (_, a), (_, b) in zip(single_random, sharded_random, strict=True)),
        "placed by the rules": all(_spec(v.get_value().sharding) == rules[path] for path, v in sharded_random),
    }
    cache = KVCache.create(config, 2, 16, jnp.float32, model.mesh)
    report["cache_specs"] = [_spec(array.sharding) for array in cache.layers[1]]
    report["extended_cache_specs"] = [_spec(array.sharding) for array in cache.extended(config, 32).layers[1]]

    loaded_expected = np.asarray(gptoss_jax.load(checkpoint, dtype=jnp.float32, kernels="xla")(tokens))
    convert_checkpoint(checkpoint, converted, progress=False)
    report["load_error"], report["load_specs"] = {}, {}
    for source, folder in (("raw", checkpoint), ("converted", converted)):
        loaded = gptoss_jax.load(folder, dtype=jnp.float32, kernels="xla", mesh=make_mesh("expert=4,tensor=2"))
        report["load_error"][source] = float(np.max(np.abs(logits(loaded) - loaded_expected)))
        report["load_specs"][source] = _spec(loaded.block[1].mlp.mlp2_weight.blocks.get_value().sharding)

    report["errors"] = {}
    twelve_experts = dataclasses.replace(config, num_experts=12)
    for name, attempt in (
        ("expert=3", lambda: make_mesh("expert=3")),
        ("tensor=8", lambda: GptOss(config, mesh=make_mesh("tensor=8"), rngs=nnx.Rngs(0))),
        ("experts", lambda: GptOss(twelve_experts, mesh=make_mesh("expert=8"), rngs=nnx.Rngs(0))),
    ):
        try:
            attempt()
        except MeshError as e:
            report["errors"][name] = str(e)
    return report


def _run_process(checkpoint: str, out: str, port: str, index: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    import gptoss_jax
    from gptoss_jax.sharding import initialize_distributed, make_mesh

    initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=int(index))
    mesh = make_mesh("expert=2,tensor=2")  # 2 devices in each process
    model = gptoss_jax.load(checkpoint, dtype=jnp.float32, kernels="xla", mesh=mesh)
    tokens = jnp.asarray(TOKENS, jnp.int32)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))(state, tokens)
    np.save(Path(out) / f"logits{index}.npy", multihost_utils.process_allgather(logits, tiled=True))
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1] == "worker":
        print(json.dumps(_run_worker(*sys.argv[2:])))
    else:
        _run_process(*sys.argv[2:])
