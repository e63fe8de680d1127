"""Model configuration: presets, both public ``config.json`` dialects, validation.

Field names follow OpenAI's ``original/config.json`` (``gpt_oss/torch/model.py`` ModelConfig);
Hugging Face's dialect (``model_type: gpt_oss``) is translated on the way in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from gptoss_jax.errors import GptOssError
from gptoss_jax.rope import yarn_correction_range
from pallas_kernels.mxfp4 import BLOCK_SIZE


class ConfigError(GptOssError):
    """A config that gpt-oss cannot run with; the message names the offending key."""


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    """Hyperparameters of a gpt-oss model (defaults: gpt-oss-120b, like the reference)."""

    num_hidden_layers: int = 36
    num_experts: int = 128
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    @property
    def max_position_embeddings(self) -> int:
        """The longest context YaRN is scaled for (131072 for gpt-oss)."""
        return int(self.initial_context_length * self.rope_scaling_factor)

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_size(self) -> int:
        """Outputs of the fused QKV projection: q, then k, then v heads."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        """Even layers attend to a window of ``sliding_window`` keys, odd layers to all."""
        return layer % 2 == 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values the model cannot run with."""
        for name in (
            "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
            "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
            "sliding_window", "initial_context_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("swiglu_limit", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha",
                     "rope_ntk_beta", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % BLOCK_SIZE:
                raise ConfigError(
                    f"{name} ({getattr(self, name)}) must be a multiple of the MXFP4 block size "
                    f"{BLOCK_SIZE}: it is the contraction axis of an expert matmul"
                )
        low, high = yarn_correction_range(
            self.head_dim, self.rope_theta, self.initial_context_length, self.rope_ntk_alpha,
            self.rope_ntk_beta,
        )
        if not 0 < low < high < self.head_dim // 2 - 1:
            raise ConfigError(
                f"YaRN correction range ({low:.3f}, {high:.3f}) must satisfy 0 < low < high < "
                f"head_dim/2 - 1 = {self.head_dim // 2 - 1}; check rope_ntk_alpha/beta, rope_theta "
                f"and initial_context_length"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GptOssConfig:
        """Build from either ``config.json`` dialect (Hugging Face or ``original/``)."""
        if "num_local_experts" in raw or raw.get("model_type") == "gpt_oss":
            return cls(**_from_hf_dict(raw))
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config keys {unknown} (neither the HF nor the original/ dialect)")
        return cls(**{key: _as_number(key, value) for key, value in raw.items()})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GptOssConfig:
        """Read a ``config.json`` in either dialect."""
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The ``original/`` dialect, which is also what converted checkpoints store."""
        return dataclasses.asdict(self)


def _as_number(key: str, value: Any) -> Any:
    # rope_theta is an integer in the published JSON; keep float fields float.
    field_type = {f.name: f.type for f in dataclasses.fields(GptOssConfig)}[key]
    if field_type == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _from_hf_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """Translate Hugging Face's ``GptOssConfig`` keys, rejecting settings gpt-oss does not use."""

    def require(key: str) -> Any:
        if key not in raw:
            raise ConfigError(f"missing key {key!r}")
        return raw[key]

    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if rope.get("rope_type", "yarn") != "yarn":
        raise ConfigError(f"rope_type must be 'yarn', got {rope.get('rope_type')!r}")
    if rope.get("truncate", False):
        raise ConfigError("rope_scaling.truncate must be false: gpt-oss keeps YaRN's correction range fractional")
    if raw.get("tie_word_embeddings", False):
        raise ConfigError("tie_word_embeddings must be false for gpt-oss")
    if raw.get("attention_bias") is False:
        raise ConfigError("attention_bias must be true for gpt-oss")
    layers = require("num_hidden_layers")
    layer_types = raw.get("layer_types")
    expected_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)] if isinstance(layers, int) else None
    if layer_types is not None and layer_types != expected_types:
        raise ConfigError("layer_types must alternate sliding_attention (even layers) and full_attention (odd layers)")
    rope_theta = rope.get("rope_theta", raw.get("rope_theta"))
    if rope_theta is None:
        raise ConfigError("missing key 'rope_theta'")
    fields = {
        "num_hidden_layers": layers,
        "num_experts": require("num_local_experts"),
        "experts_per_token": raw.get("num_experts_per_tok", raw.get("experts_per_token")),
        "vocab_size": require("vocab_size"),
        "hidden_size": require("hidden_size"),
        "intermediate_size": require("intermediate_size"),
        "swiglu_limit": raw.get("swiglu_limit", 7.0),
        "head_dim": require("head_dim"),
        "num_attention_heads": require("num_attention_heads"),
        "num_key_value_heads": require("num_key_value_heads"),
        "sliding_window": require("sliding_window"),
        "initial_context_length": rope.get("original_max_position_embeddings", raw.get("initial_context_length", 4096)),
        "rope_theta": rope_theta,
        "rope_scaling_factor": rope.get("factor", 32.0),
        "rope_ntk_alpha": rope.get("beta_slow", 1.0),
        "rope_ntk_beta": rope.get("beta_fast", 32.0),
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-5),
    }
    if fields["experts_per_token"] is None:
        raise ConfigError("missing key 'num_experts_per_tok'")
    return {key: _as_number(key, value) for key, value in fields.items()}


def to_hf_dict(config: GptOssConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a model (used to write test and demo checkpoints)."""
    # The published ids of <|return|> and <|endoftext|>, where the vocabulary has them.
    special_ids = {"eos_token_id": 200002, "pad_token_id": 199999}
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        **{key: value for key, value in special_ids.items() if value < config.vocab_size},
        "experts_per_token": config.experts_per_token,
        "num_experts_per_tok": config.experts_per_token,
        "num_local_experts": config.num_experts,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initial_context_length": config.initial_context_length,
        "intermediate_size": config.intermediate_size,
        "layer_types": ["sliding_attention" if config.is_sliding(i) else "full_attention"
                        for i in range(config.num_hidden_layers)],
        "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": config.rope_scaling_factor,
            "beta_fast": config.rope_ntk_beta,
            "beta_slow": config.rope_ntk_alpha,
            "original_max_position_embeddings": config.initial_context_length,
            "truncate": False,
        },
        "rope_theta": config.rope_theta,
        "sliding_window": config.sliding_window,
        "swiglu_limit": config.swiglu_limit,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",  # the weights' dtype, experts aside, as OpenAI's config.json says
        "vocab_size": config.vocab_size,
        "quantization_config": {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
        },
    }


PRESETS: dict[str, GptOssConfig] = {
    "gpt-oss-20b": GptOssConfig(num_hidden_layers=24, num_experts=32),
    "gpt-oss-120b": GptOssConfig(num_hidden_layers=36, num_experts=128),
    # Small models of the same structure, for tests and the embedded demo. The hidden size
    # differs from the expert size so a missing transpose cannot hide (spec pitfall P6).
    "tiny": GptOssConfig(
        num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=512, hidden_size=64,
        intermediate_size=96, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=8,
    ),
    "small": GptOssConfig(
        num_hidden_layers=4, num_experts=8, experts_per_token=4, vocab_size=2048, hidden_size=256,
        intermediate_size=320, head_dim=32, num_attention_heads=8, num_key_value_heads=2,
        sliding_window=16,
    ),
}


def preset(name: str) -> GptOssConfig:
    """A named configuration: ``gpt-oss-20b``, ``gpt-oss-120b``, ``tiny`` or ``small``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
