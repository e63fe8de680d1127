"""The two public safetensors layouts of gpt-oss and how their tensors map onto the model.

The model's parameter paths (``block.3.attn.qkv.weight``...) are the names of OpenAI's
``original/`` layout, so that layout maps one to one. Hugging Face's layout renames every
tensor and splits the fused QKV projection into q, k and v, which are concatenated back along
the output axis. MXFP4 ``blocks``/``scales`` are byte-identical in both (spec section 3). The
model groups the fused QKV rows by KV head (so a tensor-parallel split keeps query groups with
their keys and values): :func:`checkpoint_rows` and :func:`to_checkpoint_rows` convert.
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path

import numpy as np

from gptoss_jax.checkpoints.folder import CONFIG_FILENAME, checked_checkpoint_folder
from gptoss_jax.config import GptOssConfig
from gptoss_jax.errors import GptOssError
from gptoss_jax.model import fused_qkv_order


class Layout(enum.Enum):
    """A checkpoint folder's layout."""

    HF = "hf"  # config.json + model.safetensors.index.json / model*.safetensors at the root
    ORIGINAL = "original"  # config.json + model.safetensors (OpenAI's original/ folder)


class LayoutError(GptOssError):
    """A folder that is not a gpt-oss checkpoint in a known layout."""


_HF_LAYER_NAMES = {
    "attn.norm.scale": ("input_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.sinks": ("self_attn.sinks",),
    "attn.out.weight": ("self_attn.o_proj.weight",),
    "attn.out.bias": ("self_attn.o_proj.bias",),
    "mlp.norm.scale": ("post_attention_layernorm.weight",),
    "mlp.gate.weight": ("mlp.router.weight",),
    "mlp.gate.bias": ("mlp.router.bias",),
    "mlp.mlp1_weight.blocks": ("mlp.experts.gate_up_proj_blocks",),
    "mlp.mlp1_weight.scales": ("mlp.experts.gate_up_proj_scales",),
    "mlp.mlp1_bias": ("mlp.experts.gate_up_proj_bias",),
    "mlp.mlp2_weight.blocks": ("mlp.experts.down_proj_blocks",),
    "mlp.mlp2_weight.scales": ("mlp.experts.down_proj_scales",),
    "mlp.mlp2_bias": ("mlp.experts.down_proj_bias",),
}
_HF_TOP_NAMES = {
    "embedding.weight": ("model.embed_tokens.weight",),
    "norm.scale": ("model.norm.weight",),
    "unembedding.weight": ("lm_head.weight",),
}


def parameter_sources(config: GptOssConfig, layout: Layout) -> dict[str, tuple[str, ...]]:
    """Every model parameter path -> the checkpoint tensors that, concatenated on axis 0, make it."""
    layer_names = {key: (key,) for key in _HF_LAYER_NAMES} if layout is Layout.ORIGINAL else _HF_LAYER_NAMES
    top_names = {key: (key,) for key in _HF_TOP_NAMES} if layout is Layout.ORIGINAL else _HF_TOP_NAMES
    prefix = "block.{}." if layout is Layout.ORIGINAL else "model.layers.{}."
    sources = dict(top_names)
    for layer in range(config.num_hidden_layers):
        for path, names in layer_names.items():
            sources[f"block.{layer}.{path}"] = tuple(prefix.format(layer) + name for name in names)
    return sources


def qkv_split_rows(config: GptOssConfig) -> tuple[int, int, int]:
    """Rows of Hugging Face's q, k and v projections, which concatenate into the fused QKV."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    return q_rows, kv_rows, kv_rows


def source_shapes(config: GptOssConfig, names: tuple[str, ...], shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shape of each tensor in ``names`` that concatenate (axis 0) to a parameter of ``shape``."""
    if len(names) == 1:
        return [tuple(shape)]
    return [(rows, *shape[1:]) for rows in qkv_split_rows(config)]


def _reorders_rows(path: str) -> bool:
    return path.endswith(("attn.qkv.weight", "attn.qkv.bias"))


def checkpoint_rows(config: GptOssConfig, path: str, model_rows: np.ndarray) -> np.ndarray:
    """The rows of a parameter as the checkpoints hold it (HF's q, k, v concatenated) that hold
    the model's rows ``model_rows`` (int ``[R]``): the model groups the fused QKV's rows by KV
    head (``gptoss_jax.model.fused_qkv_order``); every other parameter's rows are the same."""
    return fused_qkv_order(config)[model_rows] if _reorders_rows(path) else model_rows


def to_checkpoint_rows(config: GptOssConfig, path: str, array: np.ndarray) -> np.ndarray:
    """A whole parameter as the model holds it -> as the checkpoints hold it (the row order
    :func:`checkpoint_rows` reads back)."""
    return array[np.argsort(fused_qkv_order(config))] if _reorders_rows(path) else array


def detect_layout(folder: str | os.PathLike) -> Layout:
    """Tell a Hugging Face root from an ``original/`` folder by their config and files.

    Raises:
      CheckpointError: ``folder`` is not a folder with a ``config.json``.
      LayoutError: its ``config.json`` is of neither layout.
    """
    config_path = checked_checkpoint_folder(folder) / CONFIG_FILENAME
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise LayoutError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise LayoutError(f"{config_path}: expected a JSON object")
    if raw.get("model_type") == "gpt_oss" or "num_local_experts" in raw:
        return Layout.HF
    if "num_experts" in raw:
        return Layout.ORIGINAL
    raise LayoutError(
        f"{config_path}: unknown layout (neither Hugging Face's model_type 'gpt_oss' nor OpenAI's original/ keys)"
    )


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint folder, sorted; an error if there are none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise LayoutError(f"{folder}: no .safetensors files")
    return files
