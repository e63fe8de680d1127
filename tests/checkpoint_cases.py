"""Tiny random checkpoints and the ways a checkpoint can be broken, shared by the converter and
loader tests (imported by test_convert.py and test_load.py; pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Callable
from typing import Any
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gptoss_jax.checkpoints.layouts import Layout, parameter_sources
from gptoss_jax.checkpoints.safetensors_writer import model_tensors, write_checkpoint
from gptoss_jax.config import preset
from gptoss_jax.model import GptOss

# Longer than the tiny preset's sliding window (8), so windowed layers are exercised.
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 12)), jnp.int32)
TOKENIZER_TEXT = '{"note": "stands in for a tokenizer; the converter copies it byte for byte"}\n'
# What git checks out in place of a file that Git LFS did not fetch.
GIT_LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 13761300984\n"
)
# Small enough that the tiny model's HF checkpoint spans several shards.
SHARD_BYTES = 60_000


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """One way of writing a raw checkpoint."""

    name: str
    layout: Layout
    max_shard_bytes: int | None
    # The dtype of every floating tensor but the MXFP4 experts' (those as a fine-tune saves them,
    # dense, where dense_experts), as safetensors names it.
    dtype: str = "BF16"
    dense_experts: bool = False


SOURCE_KINDS = [
    SourceKind("hf-sharded", Layout.HF, SHARD_BYTES),
    SourceKind("hf-single-file", Layout.HF, None),
    SourceKind("original", Layout.ORIGINAL, None),
]
# Fine-tuned checkpoints: the experts dense, as transformers, TRL or Unsloth save them.
DENSE_KINDS = [
    SourceKind("hf-dense-bf16-sharded", Layout.HF, SHARD_BYTES, dense_experts=True),
    SourceKind("hf-dense-f32", Layout.HF, None, dtype="F32", dense_experts=True),
    SourceKind("hf-dense-f16", Layout.HF, None, dtype="F16", dense_experts=True),
]
_NUMPY_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}


@functools.cache
def tiny_model() -> GptOss:
    """A random tiny model; RMSNorm gains random too (bf16-exact), so swapped norms would show."""
    model = GptOss(preset("tiny"), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    for index, (path, variable) in enumerate(nnx.to_flat_state(state)):
        if path[-2:] == ("norm", "scale"):
            gains = 1 + 0.1 * jax.random.normal(jax.random.key(index), variable.get_value().shape)
            variable.set_value(gains.astype(jnp.bfloat16).astype(jnp.float32))
    nnx.update(model, state)
    return model


@functools.cache
def parity_model() -> GptOss:
    """A random tiny model for comparing logits with transformers: large attention sinks, and
    router logits spread out, since a near-tie between two experts would let bfloat16 noise
    pick a different expert (spec pitfall P7), which says nothing about correctness."""
    model = GptOss(preset("tiny"), rngs=nnx.Rngs(7))
    rng = np.random.default_rng(7)
    for block in model.block:
        block.attn.sinks[...] = jnp.asarray(rng.uniform(-6, 6, model.config.num_attention_heads), jnp.bfloat16)
        block.mlp.gate.weight[...] = (block.mlp.gate.weight[...] * 25).astype(jnp.bfloat16)
    return model


def model_logits(model: GptOss) -> np.ndarray:
    """Logits ``[2, 12, 512]`` of the shared token batch."""
    return np.asarray(_jitted_forward(model, TOKENS))


@nnx.jit
def _jitted_forward(model: GptOss, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def write_source(kind: SourceKind, folder: Path) -> Path:
    """The tiny model as a raw checkpoint of ``kind`` in ``folder``, with a tokenizer.json."""
    dtype = _NUMPY_DTYPES[kind.dtype]
    write_checkpoint(tiny_model(), folder, kind.layout, max_shard_bytes=kind.max_shard_bytes,
                     dense_experts=dtype if kind.dense_experts else None)
    if kind.dtype != "BF16":
        for file in folder.glob("*.safetensors"):
            _edit_file(file, lambda tensors: tensors.update(
                {name: tensor.astype(dtype) for name, tensor in tensors.items() if tensor.dtype == ml_dtypes.bfloat16}))
    (folder / "tokenizer.json").write_text(TOKENIZER_TEXT)
    return folder



@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per source kind, written once per test module."""
    root = tmp_path_factory.mktemp("sources")
    return {kind.name: write_source(kind, root / kind.name) for kind in SOURCE_KINDS + DENSE_KINDS}

def stored_tiny_tensors(kind: SourceKind) -> dict[str, np.ndarray]:
    """The tiny model's parameters as a checkpoint of ``kind`` stores them, read back into the
    model's dtypes: float16 rounds bfloat16's smallest values (its subnormals are coarser)."""
    tensors = model_tensors(tiny_model())
    if kind.dtype != "F16":
        return tensors
    return {path: tensor if tensor.dtype == np.uint8 or path.endswith("norm.scale")  # float32, bf16-exact
            else tensor.astype(np.float16).astype(tensor.dtype) for path, tensor in tensors.items()}


def assert_same_parameters(model: GptOss, expected: GptOss | dict[str, np.ndarray]) -> None:
    """Every parameter bit-identical, with the same dtype."""
    actual_tensors = model_tensors(model)
    expected_tensors = expected if isinstance(expected, dict) else model_tensors(expected)
    assert actual_tensors.keys() == expected_tensors.keys()
    for path, tensor in expected_tensors.items():
        assert actual_tensors[path].dtype == tensor.dtype, path
        np.testing.assert_array_equal(actual_tensors[path], tensor, err_msg=path)


def recording_safe_open(reads: list[tuple[str, tuple[int, ...]]]) -> type:
    """A stand-in for safetensors' ``safe_open`` that appends ``(tensor name, shape read)`` to
    ``reads`` for every read of tensor data, whole or sliced; reading headers is not counted."""

    class RecordingSlice:
        def __init__(self, name: str, inner: Any):
            self._name, self._inner = name, inner

        def get_shape(self) -> list[int]:
            return self._inner.get_shape()

        def get_dtype(self) -> str:
            return self._inner.get_dtype()

        def __getitem__(self, index: Any) -> np.ndarray:
            data = self._inner[index]
            reads.append((self._name, data.shape))
            return data

    class RecordingSafeOpen:
        def __init__(self, *args: Any, **kwargs: Any):
            self._file = safe_open(*args, **kwargs)

        def __enter__(self) -> RecordingSafeOpen:
            self._handle = self._file.__enter__()
            return self

        def __exit__(self, *exc_info: Any) -> Any:
            return self._file.__exit__(*exc_info)

        def keys(self) -> list[str]:
            return self._handle.keys()

        def get_slice(self, name: str) -> RecordingSlice:
            return RecordingSlice(name, self._handle.get_slice(name))

        def get_tensor(self, name: str) -> np.ndarray:
            data = self._handle.get_tensor(name)
            reads.append((name, data.shape))
            return data

    return RecordingSafeOpen


def copy_folder(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def tensor_name(layout: Layout, parameter: str) -> str:
    """The (first) tensor that holds ``parameter`` in ``layout``."""
    return parameter_sources(tiny_model().config, layout)[parameter][0]


def file_holding(folder: Path, name: str) -> Path:
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            if name in f.keys():
                return file
    raise AssertionError(f"no file in {folder} holds {name}")


def _edit_file(file: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


# Each breaks a raw checkpoint folder of the given layout in place and returns the strings
# the single error message must contain (the file, and the tensor where one is at fault).
def truncate_file(folder: Path, layout: Layout) -> list[str]:
    file = file_holding(folder, tensor_name(layout, "block.1.mlp.mlp2_bias"))
    file.write_bytes(file.read_bytes()[:-100])
    return [file.name, "truncated or corrupt safetensors file"]


def garble_header(folder: Path, layout: Layout) -> list[str]:
    file = file_holding(folder, tensor_name(layout, "embedding.weight"))
    file.write_bytes(b"\xff" * 16 + file.read_bytes()[16:])
    return [file.name, "truncated or corrupt safetensors file"]


def replace_with_git_lfs_pointer(folder: Path, layout: Layout) -> list[str]:
    file = file_holding(folder, tensor_name(layout, "embedding.weight"))
    file.write_text(GIT_LFS_POINTER)
    return [file.name, "is a Git LFS pointer", "git lfs pull"]


def drop_tensor(folder: Path, layout: Layout) -> list[str]:
    name = tensor_name(layout, "block.1.mlp.mlp1_weight.scales")
    # A sharded index still lists it, so that case checks the index against the files.
    _edit_file(file_holding(folder, name), lambda tensors: tensors.pop(name))
    return [name, "missing tensor", ".safetensors"]


def add_tensor(folder: Path, layout: Layout) -> list[str]:
    file = file_holding(folder, tensor_name(layout, "norm.scale"))
    _edit_file(file, lambda tensors: tensors.update({"block.0.attn.extra": np.zeros(3, ml_dtypes.bfloat16)}))
    return [file.name, "block.0.attn.extra", "unexpected tensor"]


def _replace(folder: Path, name: str, make: Callable[[np.ndarray], np.ndarray]) -> Path:
    file = file_holding(folder, name)
    _edit_file(file, lambda tensors: tensors.update({name: make(tensors[name])}))
    return file


def reshape_tensor(folder: Path, layout: Layout) -> list[str]:
    name = tensor_name(layout, "block.0.attn.sinks")
    file = _replace(folder, name, lambda tensor: np.concatenate([tensor, tensor[:1]]))
    return [file.name, name, "shape [5]", "[4]"]


def move_qkv_rows(folder: Path) -> list[str]:
    """HF layout only: move rows from q_proj to k_proj, so the fused QKV still adds up."""
    q_name, k_name, _ = parameter_sources(tiny_model().config, Layout.HF)["block.0.attn.qkv.weight"]
    moved = 16
    q_file, k_file = file_holding(folder, q_name), file_holding(folder, k_name)
    q = load_file(q_file)[q_name]
    _replace(folder, k_name, lambda k: np.concatenate([q[-moved:], k]))
    _replace(folder, q_name, lambda tensor: tensor[:-moved])
    return [q_file.name, q_name, f"shape [{q.shape[0] - moved}, {q.shape[1]}]", f"[{q.shape[0]}, {q.shape[1]}]"]


def change_dtype(folder: Path, layout: Layout) -> list[str]:
    name = tensor_name(layout, "block.1.attn.out.weight")
    file = _replace(folder, name, lambda tensor: tensor.astype(np.int32))
    return [file.name, name, "I32", "BF16 or F16 or F32"]


def dense_original_experts(folder: Path) -> list[str]:
    """OpenAI's original/ layout with one expert weight dense (bfloat16 ``mlp1_weight`` in place
    of its blocks and scales): read in Hugging Face's layout only."""
    layout = Layout.ORIGINAL
    name = tensor_name(layout, "block.0.mlp.mlp1_weight.blocks")
    dense = name.removesuffix(".blocks")

    def make_dense(tensors: dict[str, np.ndarray]) -> None:
        experts, rows, block_count, _ = tensors.pop(name).shape
        del tensors[dense + ".scales"]
        tensors[dense] = np.zeros((experts, rows, block_count * 32), ml_dtypes.bfloat16)

    file = file_holding(folder, name)
    _edit_file(file, make_dense)
    return [file.name, f"BF16 expert weights found ({dense!r}", "original/ layout is read with MXFP4 experts only"]


def unknown_layout(folder: Path, layout: Layout) -> list[str]:
    (folder / "config.json").write_text(json.dumps({"hidden_dim": 64, "layers": 2}))
    return ["config.json", "unknown layout"]


BREAKAGES: dict[str, Callable[[Path, Layout], list[str]]] = {
    "truncated-file": truncate_file,
    "garbled-header": garble_header,
    "git-lfs-pointer": replace_with_git_lfs_pointer,
    "missing-tensor": drop_tensor,
    "unexpected-tensor": add_tensor,
    "wrong-shape": reshape_tensor,
    "wrong-dtype": change_dtype,
    "unknown-layout": unknown_layout,
}
