"""gptoss_jax.load and restore: converted and raw folders, dtypes, shardings, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
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
    recording_safe_open,
    sources,
    tiny_model,
    write_source,
)
from fake_terminal import FakeTerminal
from gptoss_jax.checkpoints import safetensors_reader
from gptoss_jax.checkpoints.folder import CheckpointError
from gptoss_jax.checkpoints.layouts import Layout, LayoutError, parameter_sources
from gptoss_jax.checkpoints.orbax_format import FORMAT_VERSION, MARKER_FILENAME, restore
from gptoss_jax.checkpoints.orbax_writer import convert_checkpoint
from gptoss_jax.checkpoints.safetensors_reader import SafetensorsCheckpoint
from gptoss_jax.checkpoints.safetensors_writer import model_tensors

REPO = Path(__file__).resolve().parents[1]
SHARDED_MESH = "data=2,expert=2,tensor=2"  # 8 devices; every shard has a replica on data


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


@pytest.mark.parametrize("kind", SOURCE_KINDS, ids=lambda kind: kind.name)
def test_reading_a_slice_reads_only_its_rows(kind: SourceKind, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    reads: list[tuple[str, tuple[int, ...]]] = []
    monkeypatch.setattr(safetensors_reader, "safe_open", recording_safe_open(reads))
    source = SafetensorsCheckpoint(sources[kind.name])
    expected = model_tensors(tiny_model())
    qkv = expected["block.1.attn.qkv.weight"]
    # The second KV head's group (its 2 query heads, key and value) in the model's row order.
    slices = {
        "block.1.attn.qkv.weight": (slice(qkv.shape[0] // 2, None), slice(8, 40)),
        "block.0.mlp.mlp1_weight.blocks": (slice(1, 3), slice(None), slice(1, 2), slice(None)),
        "norm.scale": (slice(None),),  # float32 in the model, bfloat16 on disk
    }
    for path, index in slices.items():
        reads.clear()
        part = source.read(path, index)
        assert part.dtype == expected[path].dtype
        np.testing.assert_array_equal(part, expected[path][index], err_msg=path)
        assert sum(int(np.prod(shape)) for _, shape in reads) == part.size, path  # nothing else read


@pytest.fixture(scope="module")
def sharded_loads(sources: dict[str, Path]) -> dict:
    """What loading raw folders on an 8-device CPU mesh read (this file run as a script)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, __file__, *(str(sources[kind.name]) for kind in SOURCE_KINDS)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", SOURCE_KINDS, ids=lambda kind: kind.name)
def test_sharded_load_reads_each_shard_once(kind: SourceKind, sharded_loads: dict):
    report = sharded_loads[kind.name]
    assert report["mismatched_parameters"] == []
    parameter_of = {name: path for path, names in parameter_sources(tiny_model().config, kind.layout).items()
                    for name in names}
    elements_read = dict.fromkeys(report["shards"], 0)
    for name, shape in report["reads"]:
        path = parameter_of[name]
        elements_read[path] += int(np.prod(shape))
        # One read never spans two devices' shards: each device's part is read on its own.
        assert int(np.prod(shape)) <= report["elements"][path] // report["shards"][path], (name, shape)
    assert report["shards"]["block.0.mlp.mlp1_weight.blocks"] == 4
    assert report["shards"]["block.0.attn.qkv.weight"] == 2
    # Every element exactly once, although each shard sits on two devices (data=2).
    assert elements_read == report["elements"]


@pytest.mark.parametrize("layout", ["converted", "raw"])
def test_load_draws_a_progress_bar_on_a_terminal_when_asked(
    layout: str, converted: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    folder = converted if layout == "converted" else sources["original"]
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    gptoss_jax.load(folder)  # progress is opt-in
    assert terminal.getvalue() == ""
    model = gptoss_jax.load(folder, progress=True)

    parameters = jax.tree.leaves(nnx.state(model, nnx.Param))
    total_gigabytes = sum(array.nbytes for array in parameters) / 1e9
    final = terminal.getvalue().splitlines()[-1].split("\r")[-1]
    assert terminal.getvalue().startswith("\rloading [") and terminal.getvalue().endswith("\n")
    assert final == (f"loading [{'#' * 30}] {len(parameters)}/{len(parameters)} tensors, "
                     f"{total_gigabytes:.2f} GB/{total_gigabytes:.2f} GB")


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


def _cut_in_half(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        # The largest file of an item is its array data (TensorStore's OCDBT database).
        (lambda item: _cut_in_half(max(item.rglob("*"), key=lambda path: path.stat().st_size)),
         # Which array the cut reaches varies (its chunk index has one 0 per dimension).
         r"cannot restore \(OUT_OF_RANGE: Error reading \"[\w.]+/0(\.0)*\" .*is not valid for value of size \d+\)$"),
        (lambda item: _cut_in_half(item / "_METADATA"), r"unreadable orbax metadata \(orbax found none\)$"),
    ],
    ids=["data-file-cut-in-half", "metadata-cut-in-half"],
)
def test_a_corrupt_converted_checkpoint_gives_one_clear_error(breakage, complaint: str, converted: Path, tmp_path: Path):
    checkpoint = copy_folder(converted, tmp_path / "tiny")
    item = checkpoint / "params" / "block.0"
    breakage(item)

    with pytest.raises(CheckpointError) as error_info:
        restore(checkpoint)

    message = str(error_info.value)
    assert "\n" not in message and message.startswith(f"{item.absolute()}: ")
    assert re.search(complaint, message), message


def test_load_a_path_that_is_no_checkpoint_folder(sources: dict[str, Path], tmp_path: Path):
    with pytest.raises(CheckpointError, match="^checkpoint folder not found: "):
        gptoss_jax.load(tmp_path / "absent")
    config = sources["original"] / "config.json"
    with pytest.raises(CheckpointError) as error_info:
        gptoss_jax.load(config)
    assert str(error_info.value) == f"{config} is a file: pass the checkpoint folder that holds it, {config.parent}"
    with pytest.raises(CheckpointError) as error_info:
        gptoss_jax.load(tmp_path)
    assert str(error_info.value) == f"{tmp_path}: not a gpt-oss checkpoint folder (no config.json)"


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


def _sharded_load_report(folders: list[str]) -> dict:
    """For each raw folder: what loading it on SHARDED_MESH read, and whether the parameters match."""
    from gptoss_jax.sharding import make_mesh

    expected = model_tensors(tiny_model())
    report = {}
    for kind, folder in zip(SOURCE_KINDS, folders):
        reads: list[tuple[str, tuple[int, ...]]] = []
        safetensors_reader.safe_open = recording_safe_open(reads)
        model = gptoss_jax.load(folder, kernels="xla", mesh=make_mesh(SHARDED_MESH))
        loaded = model_tensors(model)
        arrays = {".".join(map(str, path)): variable.get_value()
                  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        report[kind.name] = {
            "mismatched_parameters": [path for path, tensor in expected.items()
                                      if not np.array_equal(loaded[path], tensor)],
            "reads": [(name, list(shape)) for name, shape in reads],
            "elements": {path: int(array.size) for path, array in arrays.items()},
            "shards": {path: len({str(index) for index in array.sharding.devices_indices_map(array.shape).values()})
                       for path, array in arrays.items()},
        }
    return report


if __name__ == "__main__":
    print(json.dumps(_sharded_load_report(sys.argv[1:])))
