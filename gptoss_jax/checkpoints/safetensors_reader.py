"""Streaming, validating reader of raw gpt-oss safetensors checkpoints (HF root or ``original/``).

Opening a folder reads only the safetensors headers and checks every tensor name, shape and
dtype against ``config.json`` before any weight is read, so a bad checkpoint fails at once
with one :class:`CheckpointError` naming the file and tensor. Then :meth:`parameters` reads
one model parameter at a time (for HF's split QKV, its three pieces), so host memory stays
near the largest tensor, never the whole model; :meth:`stored_parameters` hands out
parameters that read only the slices they are indexed with, so a sharded load reads each
device's shard and nothing more.

On-disk dtypes: MXFP4 ``blocks``/``scales`` are U8, everything else BF16 as published (spec
section 3), or F16 or F32 as a fine-tune may save it: each tensor is cast to the model's dtype
(bfloat16, rounding to nearest even; RMSNorm gains float32, which ``transformers`` keeps them in).

In Hugging Face's layout the experts may also be dense, as fine-tuning recipes save them
(:mod:`~gptoss_jax.checkpoints.dense_experts`): each such tensor is quantized to MXFP4 when its
``blocks`` are read, and its ``scales`` come from the same pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from gptoss_jax.checkpoints.dense_experts import (
    DENSE_DTYPES,
    dense_name,
    dense_shape,
    expert_weight,
    quantize_dense_experts,
)
from gptoss_jax.checkpoints.folder import CONFIG_FILENAME, CheckpointError
from gptoss_jax.checkpoints.layouts import (
    Layout,
    checkpoint_rows,
    detect_layout,
    parameter_sources,
    safetensors_files,
    source_shapes,
)
from gptoss_jax.checkpoints.parameters import parameter_specs
from gptoss_jax.config import GptOssConfig
from gptoss_jax.lfs import git_lfs_pointer_message, is_git_lfs_pointer

INDEX_FILENAME = "model.safetensors.index.json"

# Model parameter dtype -> the safetensors dtypes it may be stored as.
_DISK_DTYPES = {
    np.dtype(np.uint8): ("U8",),
    np.dtype("bfloat16"): ("BF16", "F16", "F32"),
    np.dtype(np.float32): ("BF16", "F16", "F32"),
}
_NUMPY_DTYPES = {"BF16": np.dtype("bfloat16"), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32)}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what its header says, known before reading its data."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "U8", ...


def _read_header(file: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(file, framework="numpy") as f:
            return {
                name: TensorInfo(file, tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                for name in f.keys()
            }
    except (SafetensorError, OSError) as e:
        if is_git_lfs_pointer(file):
            raise CheckpointError(git_lfs_pointer_message(file)) from None
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None


def _read_weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to file names")
    return weight_map


class SafetensorsCheckpoint:
    """A raw checkpoint folder, validated on construction and read tensor by tensor.

    Attributes:
      folder: the checkpoint folder.
      layout: :class:`Layout.HF` or :class:`Layout.ORIGINAL`, detected from ``config.json``.
      config: the model configuration it holds.

    Raises (on construction):
      LayoutError: ``config.json`` is of neither known layout.
      ConfigError: ``config.json`` holds values gpt-oss cannot run with.
      CheckpointError: not a folder with ``config.json``; a truncated or corrupt file, a missing
        or unexpected tensor, a wrong shape or dtype (the message names the file and tensor).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.layout: Layout = detect_layout(self.folder)
        self.config = GptOssConfig.from_json_file(self.folder / CONFIG_FILENAME)
        self._specs = parameter_specs(self.config)
        self._sources = parameter_sources(self.config, self.layout)
        self._tensors = self._scan_headers()
        self._dense_experts = self._find_dense_experts()
        self._quantized: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None  # the last dense weight's MXFP4
        self._check_tensors()

    def __len__(self) -> int:
        """The number of model parameters :meth:`parameters` yields."""
        return len(self._sources)

    @property
    def total_bytes(self) -> int:
        """Bytes of all parameters as the model holds them."""
        return sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in self._specs.values())

    def _scan_headers(self) -> dict[str, TensorInfo]:
        index_path = self.folder / INDEX_FILENAME
        weight_map = _read_weight_map(index_path) if index_path.is_file() else None
        if weight_map is None:
            files = safetensors_files(self.folder)
        else:
            files = [self.folder / name for name in sorted(set(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{index_path}: lists {file.name}, which does not exist")
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in _read_header(file).items():
                if name in tensors:
                    raise CheckpointError(f"{file}: tensor {name!r} is also in {tensors[name].file}")
                if weight_map is not None and name not in weight_map:
                    raise CheckpointError(f"{file}: unexpected tensor {name!r}, not listed in {index_path.name}")
                if weight_map is not None and weight_map[name] != file.name:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} is here, but {index_path.name} places it in {weight_map[name]}"
                    )
                tensors[name] = info
        if weight_map is not None:
            for name, file_name in weight_map.items():
                if name not in tensors:
                    raise CheckpointError(
                        f"{self.folder / file_name}: missing tensor {name!r} (listed in {index_path.name})"
                    )
        return tensors

    def _find_dense_experts(self) -> dict[str, str]:
        """Expert weight (``block.0.mlp.mlp1_weight``) -> its dense tensor, where it is stored so."""
        if self.layout is not Layout.HF:
            return {}
        dense = {}
        for path, names in self._sources.items():
            weight = expert_weight(path)
            if (weight is not None and path.endswith(".blocks") and names[0] not in self._tensors
                    and dense_name(weight) in self._tensors):
                dense[weight] = dense_name(weight)
        return dense

    def quantization_note(self) -> str | None:
        """One line for the user when dense expert weights will be quantized as they are read; else None."""
        if not self._dense_experts:
            return None
        dtypes = sorted({str(_NUMPY_DTYPES[self._tensors[name].dtype]) for name in self._dense_experts.values()})
        return (f"{self.folder}: quantizing its {' and '.join(dtypes)} expert weights "
                f"({len(self._dense_experts)} tensors) to MXFP4 by the OCP MX rule as they load")

    def _check_tensors(self) -> None:
        """Every tensor the config needs is present, in its shape and dtype, and nothing else."""
        expected = {name for path, names in self._sources.items() for name in names
                    if expert_weight(path) not in self._dense_experts}
        expected.update(self._dense_experts.values())
        files = sorted({info.file.name for info in self._tensors.values()})
        for path, names in self._sources.items():
            weight = expert_weight(path)
            if weight in self._dense_experts:
                self._check_dense_experts(weight)
                continue
            for name in names:
                if name not in self._tensors:
                    self._check_not_dequantized(path, name)
                    if weight is not None and self._dense_experts:  # the other experts are dense
                        name, path = dense_name(weight), weight
                    raise CheckpointError(
                        f"{self.folder}: missing tensor {name!r} (parameter {path}; "
                        f"looked in {', '.join(files)})"
                    )
            self._check_parameter(path, names)
        for name, info in self._tensors.items():
            if name not in expected:
                raise CheckpointError(
                    f"{info.file}: unexpected tensor {name!r}, not part of a gpt-oss model "
                    f"with this config.json"
                )

    def _check_not_dequantized(self, path: str, name: str) -> None:
        """Name the likely cause when MXFP4 blocks are missing from an ``original/`` folder: dense
        experts (``mlp1_weight`` in place of ``mlp1_weight.blocks``), which are read in Hugging
        Face's layout only (where fine-tuning recipes write them)."""
        if self.layout is not Layout.ORIGINAL or not path.endswith(".blocks"):
            return
        dense = name.removesuffix(".blocks")
        info = self._tensors.get(dense)
        if info is not None:
            raise CheckpointError(
                f"{info.file}: {info.dtype} expert weights found ({dense!r} instead of MXFP4 blocks and "
                "scales); OpenAI's original/ layout is read with MXFP4 experts only: save the model in "
                "Hugging Face's layout (mlp.experts.gate_up_proj and down_proj), which is read dense too"
            )

    def _check_dense_experts(self, weight: str) -> None:
        name = self._dense_experts[weight]
        info = self._tensors[name]
        if info.dtype not in DENSE_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected {' or '.join(DENSE_DTYPES)}"
            )
        expected = dense_shape(self.config, weight)
        if tuple(info.shape) != expected:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but config.json needs "
                f"{list(expected)} for {weight} (dense experts as transformers saves them)"
            )

    def _check_parameter(self, path: str, names: tuple[str, ...]) -> None:
        spec = self._specs[path]
        allowed = _DISK_DTYPES[np.dtype(spec.dtype)]
        for name in names:
            info = self._tensors[name]
            if info.dtype not in allowed:
                raise CheckpointError(
                    f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected {' or '.join(allowed)}"
                )
        # HF splits qkv by output rows into q, k and v, each of a known size.
        for name, expected in zip(names, source_shapes(self.config, names, spec.shape)):
            info = self._tensors[name]
            if tuple(info.shape) != expected:
                raise CheckpointError(
                    f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but config.json "
                    f"needs {list(expected)} for {path}"
                )

    def _read_tensor_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        info = self._tensors[name]
        try:
            with safe_open(info.file, framework="numpy") as f:
                return f.get_slice(name)[index]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({e})") from None

    def read(self, path: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Parameter ``path``, or its part ``index`` (one slice per axis), as the model holds it.

        Only what ``index`` selects is read from disk: each run of consecutive rows of one
        source tensor with one slice (the fused QKV's rows are grouped by KV head in the model,
        :func:`checkpoint_rows`, so a KV head's q, k and v rows are three runs).
        """
        spec = self._specs[path]
        if index is None:
            index = (slice(None),) * len(spec.shape)
        weight = expert_weight(path)
        if weight in self._dense_experts:
            blocks, scales = self._quantize(weight)
            return (blocks if path.endswith(".blocks") else scales)[index]
        rows = checkpoint_rows(self.config, path, np.arange(spec.shape[0])[index[0]])
        names = self._sources[path]
        first_rows = np.cumsum([0] + [self._tensors[name].shape[0] for name in names])
        source_of_row = np.searchsorted(first_rows, rows, side="right") - 1
        run_starts = np.flatnonzero((np.diff(rows) != 1) | (np.diff(source_of_row) != 0)) + 1
        blocks = []
        for run in np.split(np.arange(len(rows)), run_starts):
            source = source_of_row[run[0]]
            first = rows[run[0]] - first_rows[source]
            blocks.append(self._read_tensor_slice(names[source], (slice(first, first + len(run)), *index[1:])))
        array = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return array.astype(spec.dtype, copy=False)

    def _quantize(self, weight: str) -> tuple[np.ndarray, np.ndarray]:
        """The MXFP4 ``(blocks, scales)`` of a dense expert weight, quantized once for both."""
        if self._quantized is None or self._quantized[0] != weight:
            self._quantized = None  # before quantizing the next: one weight's MXFP4 at a time
            name = self._dense_experts[weight]
            info = self._tensors[name]
            quantized = quantize_dense_experts(
                lambda experts: self._read_tensor_slice(name, (experts,)), info.shape,
                _NUMPY_DTYPES[info.dtype], f"{info.file}: tensor {name!r}",
            )
            self._quantized = weight, quantized
        return self._quantized[1]

    def _done_with(self, path: str) -> None:
        """Drop a dense weight's MXFP4 once its scales, which follow its blocks, are handed out."""
        if path.endswith(".scales") and expert_weight(path) in self._dense_experts:
            self._quantized = None

    def stored_parameters(self) -> Iterator[tuple[str, StoredParameter]]:
        """Yield ``(parameter path, StoredParameter)`` for every parameter; nothing is read yet.

        Take each before asking for the next: a dense expert weight's MXFP4 is dropped then.
        """
        for path in self._sources:
            spec = self._specs[path]
            yield path, StoredParameter(self, path, spec.shape, np.dtype(spec.dtype))
            self._done_with(path)

    def parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(parameter path, array)`` one at a time, in the model's shapes and dtypes.

        Paths are the model's (= ``original/`` tensor names), e.g. ``block.0.attn.qkv.weight``
        ``[qkv_size, H]`` bfloat16, its rows in the model's order (:func:`checkpoint_rows`).
        Nothing is kept after it is yielded.
        """
        for path in self._sources:
            yield path, self.read(path)
            self._done_with(path)


@dataclasses.dataclass(frozen=True)
class StoredParameter:
    """A parameter of a :class:`SafetensorsCheckpoint`, read from disk when it is indexed.

    ``stored[index]`` (one slice per axis) reads only that part, so placing it shard by shard
    (``jax.make_array_from_callback``) reads only the shards of this process's devices;
    ``np.asarray(stored)`` reads it whole.
    """

    checkpoint: SafetensorsCheckpoint
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return self.checkpoint.read(self.path, index)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        array = self.checkpoint.read(self.path)
        return array if dtype is None else array.astype(dtype, copy=False)
