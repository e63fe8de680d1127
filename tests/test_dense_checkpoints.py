"""Fine-tuned checkpoints: dense expert weights (bfloat16, float16, float32) in Hugging Face's
layout, quantized to MXFP4 as they load and convert; ``convert --to hf``; bad input.

transformers on the CPU is the oracle: it makes the dequantized save itself
(``Mxfp4Config(dequantize=True)`` then ``save_pretrained``), and computes the logits of weights
quantized by the test's own model of the OCP rule (``mx_reference``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import gptoss_jax
from checkpoint_cases import (
    DENSE_KINDS,
    TOKENIZER_TEXT,
    SourceKind,
    assert_same_parameters,
    copy_folder,
    dense_original_experts,
    file_holding,
    parity_model,
    sources,
    stored_tiny_tensors,
    tiny_model,
)
from gptoss_jax.checkpoints.folder import CheckpointError
from gptoss_jax.checkpoints.hf_export import export_hf_checkpoint
from gptoss_jax.checkpoints.layouts import Layout
from gptoss_jax.checkpoints.orbax_writer import convert_checkpoint
from gptoss_jax.checkpoints.safetensors_writer import model_tensors, write_checkpoint
from gptoss_jax.cli import main
from mx_reference import reference_dequantize, reference_quantize

REPO = Path(__file__).resolve().parents[1]
SEQUENCE_LENGTH = 40
EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, list[str]]:
    status = main([str(arg) for arg in argv])
    return status, capsys.readouterr().err.splitlines()


def note(folder: Path, dtype: str) -> str:
    return f"{folder}: quantizing its {dtype} expert weights (4 tensors) to MXFP4 by the OCP MX rule as they load"


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(3).integers(0, parity_model().config.vocab_size, (2, SEQUENCE_LENGTH))


def our_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    model = gptoss_jax.load(folder, dtype=jnp.float32, kernels="xla")
    return np.asarray(model(jnp.asarray(tokens, jnp.int32)))


def transformers_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    """float32 logits of transformers' GptOssForCausalLM; MXFP4 experts dequantized on the CPU."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    config = json.loads((folder / "config.json").read_text())
    quantized = "quantization_config" in config
    model = GptOssForCausalLM.from_pretrained(
        folder, dtype=torch.float32, **({"quantization_config": Mxfp4Config(dequantize=True)} if quantized else {}))
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


# Loading and converting the tiny model saved with dense experts.


@pytest.mark.parametrize("kind", DENSE_KINDS, ids=lambda kind: kind.name)
def test_a_dense_save_loads_as_its_mxfp4_original(kind: SourceKind, sources: dict[str, Path]):
    lines: list[str] = []
    model = gptoss_jax.load(sources[kind.name], on_status=lines.append)

    assert_same_parameters(model, stored_tiny_tensors(kind))
    dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[kind.dtype]
    assert lines == [note(sources[kind.name], dtype)]


@pytest.mark.parametrize("kind", DENSE_KINDS, ids=lambda kind: kind.name)
def test_a_dense_save_converts_to_its_mxfp4_original(
    kind: SourceKind, sources: dict[str, Path], capsys: pytest.CaptureFixture, tmp_path: Path
):
    status, err = run_cli(capsys, "convert", sources[kind.name], tmp_path / "converted", "--no-progress")

    assert (status, err) == (0, [note(sources[kind.name], {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[kind.dtype])])
    assert_same_parameters(gptoss_jax.load(tmp_path / "converted"), stored_tiny_tensors(kind))


SHARDED_LOAD = """
import sys
import numpy as np
import gptoss_jax
from gptoss_jax.checkpoints.safetensors_writer import model_tensors
from gptoss_jax.sharding import make_mesh
folder, expected = sys.argv[1:]
model = gptoss_jax.load(folder, kernels="xla", mesh=make_mesh("data=2,expert=2,tensor=2"))
blocks = model.block[1].mlp.mlp1_weight.blocks[...]
assert len(blocks.sharding.device_set) == 8, blocks.sharding
loaded, expected = model_tensors(model), np.load(expected)
print([path for path in expected.files  # bytes: NumPy saves bfloat16 as an opaque dtype
       if not np.array_equal(loaded[path].view(np.uint8), expected[path].view(np.uint8))])
"""


def test_a_dense_save_loads_sharded_over_eight_devices(sources: dict[str, Path], tmp_path: Path):
    # Each expert weight is quantized once, and each device's shards of its blocks and scales
    # are cut from it (a process quantizes the whole tensor, then places its devices' parts).
    np.savez(tmp_path / "expected.npz", **model_tensors(tiny_model()))
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", SHARDED_LOAD, sources[DENSE_KINDS[0].name], tmp_path / "expected.npz"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_dense_experts_in_the_original_layout_are_named(sources: dict[str, Path], tmp_path: Path):
    source = copy_folder(sources["original"], tmp_path / "original")
    expected_parts = dense_original_experts(source)
    with pytest.raises(CheckpointError) as error_info:
        gptoss_jax.load(source)
    assert all(part in str(error_info.value) for part in expected_parts), str(error_info.value)


# transformers' own dequantized save, and weights off the MXFP4 grid as a fine-tune leaves them.


@pytest.fixture(scope="module")
def parity_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The parity model in MXFP4 (as OpenAI publishes it) and transformers' dequantized save of it."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    root = tmp_path_factory.mktemp("parity")
    mxfp4 = write_checkpoint(parity_model(), root / "mxfp4", Layout.HF)
    model = GptOssForCausalLM.from_pretrained(mxfp4, dtype=torch.bfloat16,
                                              quantization_config=Mxfp4Config(dequantize=True))
    model.save_pretrained(root / "dequantized")
    (root / "dequantized" / "tokenizer.json").write_text(TOKENIZER_TEXT)
    return {"mxfp4": mxfp4, "dequantized": root / "dequantized"}


def test_transformers_dequantized_save_is_dense(parity_folders: dict[str, Path]):
    folder = parity_folders["dequantized"]
    names = {name for file in folder.glob("*.safetensors") for name in safe_open(file, "numpy").keys()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any(name.endswith(("_blocks", "_scales")) for name in names)


@pytest.mark.parametrize("route", ["raw", "converted"])
def test_transformers_dequantized_save_gives_the_original_logits(
    route: str, parity_folders: dict[str, Path], tokens: np.ndarray, tmp_path: Path
):
    folder = parity_folders["dequantized"]
    if route == "converted":
        folder = convert_checkpoint(folder, tmp_path / "converted", progress=False)

    logits = our_logits(folder, tokens)

    original = our_logits(parity_folders["mxfp4"], tokens)
    assert np.abs(original).max() > 0.1
    np.testing.assert_allclose(logits, original, atol=1e-5, rtol=0)
    assert_same_parameters(gptoss_jax.load(folder), parity_model())  # each expert's bytes, too


@pytest.fixture(scope="module")
def off_grid_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The parity model with random bfloat16 experts off the MXFP4 grid, as a fine-tune leaves
    them ("off-grid"), and the same with each expert weight quantized and dequantized by the
    reference rule ("reference"), both dense."""
    root = tmp_path_factory.mktemp("off-grid")
    folders = {name: write_checkpoint(parity_model(), root / name, Layout.HF, dense_experts=ml_dtypes.bfloat16)
               for name in ("off-grid", "reference")}
    rng = np.random.default_rng(5)
    for file in folders["off-grid"].glob("*.safetensors"):
        off_grid, reference = load_file(file), {}
        for name, tensor in off_grid.items():
            if name.endswith(EXPERT_TENSORS):
                # [E, K, N]; the parity model's experts are about this size.
                weights = (rng.standard_normal(tensor.shape) * 0.04).astype(ml_dtypes.bfloat16)
                codes, scales = reference_quantize(np.swapaxes(weights, 1, 2))
                off_grid[name] = weights
                # Contiguous: safetensors writes an array's buffer as it lies in memory.
                reference[name] = np.ascontiguousarray(
                    np.swapaxes(reference_dequantize(codes, scales), 1, 2).astype(ml_dtypes.bfloat16))
            else:
                reference[name] = tensor
        save_file(off_grid, file)
        save_file(reference, folders["reference"] / file.name)
    (folders["off-grid"] / "tokenizer.json").write_text(TOKENIZER_TEXT)
    return folders


def test_off_grid_weights_match_transformers_on_the_reference_rule(
    off_grid_folders: dict[str, Path], tokens: np.ndarray
):
    ours = our_logits(off_grid_folders["off-grid"], tokens)

    expected = transformers_logits(off_grid_folders["reference"], tokens)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(ours, expected, atol=2e-3, rtol=0)


# convert --to hf


def test_convert_to_hf_writes_openai_published_layout(off_grid_folders: dict[str, Path], tmp_path: Path):
    destination = export_hf_checkpoint(off_grid_folders["off-grid"], tmp_path / "hf", max_shard_bytes=200_000,
                                       progress=False)

    config = json.loads((destination / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    index = json.loads((destination / "model.safetensors.index.json").read_text())
    files = sorted(destination.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == [file.name for file in files]
    with safe_open(destination / index["weight_map"]["model.layers.1.mlp.experts.down_proj_blocks"], "numpy") as f:
        blocks = f.get_slice("model.layers.1.mlp.experts.down_proj_blocks")
        assert (blocks.get_dtype(), blocks.get_shape()) == ("U8", [4, 64, 3, 16])  # [E, H, I/32, 16]
    assert not any(name.endswith(EXPERT_TENSORS) for name in index["weight_map"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]  # no staging folder left


def test_convert_to_hf_loads_in_transformers_and_here_again(
    off_grid_folders: dict[str, Path], tokens: np.ndarray, capsys: pytest.CaptureFixture, tmp_path: Path
):
    source = off_grid_folders["off-grid"]
    status, err = run_cli(capsys, "convert", source, tmp_path / "hf", "--to", "hf", "--no-progress")
    assert (status, err[0]) == (0, note(source, "bfloat16"))

    np.testing.assert_allclose(transformers_logits(tmp_path / "hf", tokens), our_logits(source, tokens),
                               atol=1e-3, rtol=0)
    # transformers computes the same as on the reference rule's weights: the experts are the same.
    np.testing.assert_allclose(transformers_logits(tmp_path / "hf", tokens),
                               transformers_logits(off_grid_folders["reference"], tokens), atol=1e-5, rtol=0)
    assert_same_parameters(gptoss_jax.load(tmp_path / "hf"), model_tensors(gptoss_jax.load(source)))


def test_convert_to_hf_from_a_converted_checkpoint(sources: dict[str, Path], tmp_path: Path):
    converted = convert_checkpoint(sources["hf-sharded"], tmp_path / "converted", progress=False)
    export_hf_checkpoint(converted, tmp_path / "hf", progress=False)

    assert_same_parameters(gptoss_jax.load(tmp_path / "hf"), tiny_model())


# Bad input: one clear line, nothing left written.


def _drop_down_proj(folder: Path) -> list[str]:
    name = "model.layers.1.mlp.experts.down_proj"
    file = file_holding(folder, name)
    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file)
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():  # the index stays consistent: the tensor is simply not in the checkpoint
        index = json.loads(index_path.read_text())
        del index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    return ["missing tensor 'model.layers.1.mlp.experts.down_proj'", "parameter block.1.mlp.mlp2_weight"]


def _transpose_gate_up(folder: Path) -> list[str]:
    # Forgetting transformers' transpose: [E, 2I, H] where [E, H, 2I] is saved.
    name = "model.layers.0.mlp.experts.gate_up_proj"
    file = file_holding(folder, name)
    tensors = load_file(file)
    tensors[name] = np.ascontiguousarray(np.swapaxes(tensors[name], 1, 2))
    save_file(tensors, file)
    return [file.name, name, "shape [4, 192, 64]", "needs [4, 64, 192] for block.0.mlp.mlp1_weight"]


def _nan_in_experts(folder: Path) -> list[str]:
    name = "model.layers.1.mlp.experts.gate_up_proj"
    file = file_holding(folder, name)
    tensors = load_file(file)
    tensors[name][2, 5, 7] = np.nan
    save_file(tensors, file)
    return [file.name, name, "expert 2 holds NaN or infinite weights"]


DENSE_BREAKAGES = {"missing-expert-tensor": _drop_down_proj, "wrong-shape": _transpose_gate_up,
                   "nan": _nan_in_experts}


@pytest.mark.parametrize("kind", DENSE_KINDS[:2], ids=lambda kind: kind.name)
@pytest.mark.parametrize("breakage", DENSE_BREAKAGES)
def test_bad_dense_source_gives_one_clear_error(breakage: str, kind: SourceKind, sources: dict[str, Path], tmp_path: Path):
    source = copy_folder(sources[kind.name], tmp_path / "source")
    expected_parts = DENSE_BREAKAGES[breakage](source)

    with pytest.raises(CheckpointError) as error_info:
        gptoss_jax.load(source)

    message = str(error_info.value)
    assert "\n" not in message and all(part in message for part in expected_parts), message


@pytest.mark.parametrize("to", ["orbax", "hf"])
@pytest.mark.parametrize("breakage", DENSE_BREAKAGES)
def test_bad_dense_source_converts_to_one_error_line_and_nothing(
    breakage: str, to: str, capsys: pytest.CaptureFixture, sources: dict[str, Path], tmp_path: Path
):
    source = copy_folder(sources[DENSE_KINDS[0].name], tmp_path / "source")
    expected_parts = DENSE_BREAKAGES[breakage](source)

    status, err = run_cli(capsys, "convert", source, tmp_path / "new" / "converted", "--to", to, "--no-progress")

    assert status == 1
    errors = [line for line in err if line.startswith("gptoss-jax: error: ")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert all(part in errors[0] for part in expected_parts), errors[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]
