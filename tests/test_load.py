"""gptoss_jax.load and restore: converted and raw folders, dtypes, shardings, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gptoss_jax
from checkpoint_cases import (
    BREAKAGES,
    SOURCE_KINDS,
    TOKENS,
    SourceKind,
    assert_same_parameters,
    copy_folder,
    model_logits,
    move_qkv_rows,
    sources,
    tiny_model,
    write_source,
)
from convert import convert_checkpoint
from convert.layouts import Layout, LayoutError
from gptoss_jax.checkpoint import FORMAT_VERSION, MARKER_FILENAME, CheckpointError, restore


@pytest.fixture(scope="module")
def converted(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_checkpoint(sources["hf-sharded"], tmp_path_factory.mktemp("converted") / "tiny", progress=False)


def test_load_converted_checkpoint(converted: Path):
    model = gptoss_jax.load(converted)

    assert isinstance(model, gptoss_jax.GptOss) and model.dtype == jnp.bfloat16
    logits = model_logits(model)
    assert logits.dtype == np.float32 and logits.shape == (*TOKENS.shape, model.config.vocab_size)
    np.testing.assert_array_equal(logits, model_logits(tiny_model()))


@pytest.mark.parametrize("kind", SOURCE_KINDS, ids=lambda kind: kind.name)
def test_load_raw_folder(kind: SourceKind, sources: dict[str, Path]):
    model = gptoss_jax.load(sources[kind.name])

    assert_same_parameters(model, tiny_model())
    np.testing.assert_array_equal(model_logits(model), model_logits(tiny_model()))


def test_load_float32_compute(converted: Path):
    model = gptoss_jax.load(converted, dtype=jnp.float32, kernels="xla")

    assert (model.dtype, model.kernels) == (jnp.float32, "xla")
    assert_same_parameters(model, tiny_model())  # parameters keep the checkpoint's dtypes


def test_restore_places_parameters_on_the_given_shardings(converted: Path):
    device = jax.devices()[-1]
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array([device]), ("model",)),
                                          jax.sharding.PartitionSpec())
    model = restore(converted, shardings={"block.1.mlp.mlp1_weight.blocks": sharding})

    assert model.block[1].mlp.mlp1_weight.blocks[...].sharding == sharding
    assert isinstance(model.block[0].mlp.mlp1_weight.blocks[...].sharding, jax.sharding.SingleDeviceSharding)


def test_restore_rejects_a_raw_folder(sources: dict[str, Path]):
    with pytest.raises(CheckpointError, match=f"not a converted gptoss-jax checkpoint .no {MARKER_FILENAME}"):
        restore(sources["original"])


def test_restore_rejects_a_config_that_does_not_match(converted: Path, tmp_path: Path):
    checkpoint = copy_folder(converted, tmp_path / "tiny")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_experts": 8}))

    with pytest.raises(CheckpointError, match=r"block\.0.*'block\.0\.mlp\.gate\.bias' is bfloat16\[4\], the config needs bfloat16\[8\]"):
        restore(checkpoint)


def test_restore_rejects_a_newer_format(converted: Path, tmp_path: Path):
    checkpoint = copy_folder(converted, tmp_path / "tiny")
    marker = json.loads((checkpoint / MARKER_FILENAME).read_text())
    (checkpoint / MARKER_FILENAME).write_text(json.dumps({**marker, "version": FORMAT_VERSION + 1}))

    with pytest.raises(
        CheckpointError, match=f"format version {FORMAT_VERSION + 1}; this gptoss-jax reads version {FORMAT_VERSION}"
    ):
        restore(checkpoint)


def test_load_missing_folder(tmp_path: Path):
    with pytest.raises(LayoutError, match="not a folder"):
        gptoss_jax.load(tmp_path / "absent")


@pytest.mark.parametrize("kind", [kind for kind in SOURCE_KINDS if kind.layout is Layout.HF], ids=lambda kind: kind.name)
def test_hf_qkv_pieces_of_the_wrong_sizes_are_caught(kind: SourceKind, sources: dict[str, Path], tmp_path: Path):
    # The pieces still add up to the fused QKV's rows; each piece's own size is what is wrong.
    source = copy_folder(sources[kind.name], tmp_path / "source")
    expected_parts = move_qkv_rows(source)
    with pytest.raises(CheckpointError) as error_info:
        gptoss_jax.load(source)
    for part in expected_parts:
        assert part in str(error_info.value)


@pytest.mark.parametrize("kind", SOURCE_KINDS, ids=lambda kind: kind.name)
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_bad_raw_folder_gives_one_clear_error(breakage: str, kind: SourceKind, sources: dict[str, Path], tmp_path: Path):
    source = copy_folder(sources[kind.name], tmp_path / "source")
    expected_parts = BREAKAGES[breakage](source, kind.layout)
    files_before = sorted(tmp_path.rglob("*"))

    with pytest.raises((CheckpointError, LayoutError)) as error_info:
        gptoss_jax.load(source)

    message = str(error_info.value)
    assert "\n" not in message
    for part in expected_parts:
        assert part in message
    assert sorted(tmp_path.rglob("*")) == files_before


def test_load_accepts_float32_norm_gains(sources: dict[str, Path], tmp_path: Path):
    # transformers keeps RMSNorm gains in float32, and save_pretrained writes them so.
    source = copy_folder(sources["original"], tmp_path / "source")
    tensors = load_file(source / "model.safetensors")
    for name in tensors:
        if name.endswith("norm.scale"):
            tensors[name] = tensors[name].astype(np.float32)
    save_file(tensors, source / "model.safetensors")

    assert_same_parameters(gptoss_jax.load(source), tiny_model())
