"""Presets, both config.json dialects, and clear rejections."""

import dataclasses
import json

import pytest

from gptoss_jax.config import ConfigError, GptOssConfig, preset, to_hf_dict

# OpenAI's original/config.json of gpt-oss-20b (spec section 1.2); rope_theta is an integer.
ORIGINAL_20B = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
    "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}

# Hugging Face's config.json of gpt-oss-120b (spec section 1.3).
HF_120B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
    "attention_dropout": 0.0, "eos_token_id": 200002, "pad_token_id": 199999,
    "experts_per_token": 4, "num_experts_per_tok": 4, "num_local_experts": 128, "head_dim": 64,
    "hidden_size": 2880, "intermediate_size": 2880, "initial_context_length": 4096,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
    "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 36,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False},
    "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "vocab_size": 201088,
    "quantization_config": {"quant_method": "mxfp4"},
}


def test_original_dialect_reads_as_the_20b_preset():
    assert GptOssConfig.from_dict(ORIGINAL_20B) == preset("gpt-oss-20b")


def test_hf_dialect_reads_as_the_120b_preset():
    config = GptOssConfig.from_dict(HF_120B)
    assert config == preset("gpt-oss-120b")
    assert config.max_position_embeddings == 131072
    assert isinstance(config.rope_theta, float)


def test_hf_v5_rope_parameters_are_read():
    raw = {key: value for key, value in HF_120B.items() if key not in ("rope_scaling", "rope_theta")}
    raw["rope_parameters"] = {**HF_120B["rope_scaling"], "rope_theta": 150000.0}
    assert GptOssConfig.from_dict(raw) == preset("gpt-oss-120b")


@pytest.mark.parametrize("dtype_key", ["torch_dtype", "dtype"])
def test_a_dequantized_save_of_either_transformers_generation_is_read(dtype_key):
    # What save_pretrained writes after Mxfp4Config(dequantize=True): no quantization_config,
    # the dtype under transformers 4's or 5's key.
    raw = {key: value for key, value in HF_120B.items() if key != "quantization_config"}
    assert GptOssConfig.from_dict({**raw, dtype_key: "bfloat16"}) == preset("gpt-oss-120b")


@pytest.mark.parametrize("name", ["tiny", "small", "gpt-oss-20b"])
def test_both_dialects_round_trip(name):
    config = preset(name)
    assert GptOssConfig.from_dict(config.to_dict()) == config
    assert GptOssConfig.from_dict(json.loads(json.dumps(to_hf_dict(config)))) == config


def test_sliding_layers_are_the_even_ones():
    config = preset("gpt-oss-20b")
    assert [config.is_sliding(layer) for layer in range(4)] == [True, False, True, False]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 60}, "multiple of num_key_value_heads"),
        ({"hidden_size": 2881}, "multiple of the MXFP4 block size"),
        ({"experts_per_token": 40}, "exceeds num_experts"),
        ({"num_hidden_layers": 0}, "positive integer"),
        ({"rope_theta": -1.0}, "positive number"),
        ({"rope_ntk_alpha": 64.0}, "YaRN correction range"),
    ],
)
def test_inconsistent_values_are_rejected(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(preset("gpt-oss-20b"), **change)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {**HF_120B["rope_scaling"], "truncate": True}}, "truncate must be false"),
        ({"layer_types": ["full_attention"] * 36}, "layer_types must alternate"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"num_local_experts": None}, "positive integer"),
    ],
)
def test_hf_settings_gpt_oss_does_not_use_are_rejected(change, message):
    with pytest.raises(ConfigError, match=message):
        GptOssConfig.from_dict({**HF_120B, **change})


def test_missing_and_unknown_keys_are_named():
    raw = dict(HF_120B)
    del raw["head_dim"]
    with pytest.raises(ConfigError, match="'head_dim'"):
        GptOssConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="unknown config keys \\['colour'\\]"):
        GptOssConfig.from_dict({**ORIGINAL_20B, "colour": "blue"})


def test_bad_json_file_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        GptOssConfig.from_json_file(path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'gpt-oss-7b'"):
        preset("gpt-oss-7b")
