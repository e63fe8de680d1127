"""Memory from shapes and from the compiler (benchmarks/memory/budget.py): the goals, and bounded programs."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.memory import budget
from benchmarks.gpu.gpu_session import GenerateCase
from gptoss_jax import footprint
from gptoss_jax.config import preset


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_parameters_fit_the_goal(name):
    parts = budget.parameter_bytes(name)
    assert sum(parts.values()) / 1e9 < budget.GOALS_GB[name]
    # The experts are what MXFP4 keeps small: 4.25 bits per weight.
    config = budget.preset(name)
    expert_weights = config.num_hidden_layers * config.num_experts * 3 * config.hidden_size * config.intermediate_size
    assert parts["experts (MXFP4 blocks + scales)"] == expert_weights * 17 // 32


def test_the_initializer_and_decode_loop_stay_within_their_bounds_at_real_layer_shapes():
    """gpt-oss-20b's layers, 2 of them (a sliding and a full one), batch 1, 1024 + 256 tokens.

    Bounds, from the compiler: each part of the random initializer draws with less than one
    block's bytes of temporaries; decoding holds no more than the CPU's float32 copies of the
    unembedding (2 x 2.3 GB) and of each layer's attention weights (0.1 GB), plus one block's
    bytes. Decoding all experts of a layer to bfloat16 at once (1.2 GB), a cache held twice or
    the initializer drawn whole (92 GB at full depth) would each break them.
    """
    case = GenerateCase("gpt-oss-20b", "pallas", 1, 1024, 256)
    report = budget.case_report(case, layers=2)
    config = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=2)
    parts = footprint.parameter_bytes(config)
    block_bytes = (sum(parts.values()) - parts["embedding + unembedding (bf16)"]) / 2
    programs = {program["program"]: program for program in report["programs"]}
    assert set(programs) == {*(f"initializer: {kind}" for kind in budget.PART_KINDS),
                             "prefill (first chunk)", "prefill (later chunk)", "decode"}
    for kind in budget.PART_KINDS:
        assert programs[f"initializer: {kind}"]["temp_bytes"] < block_bytes, kind
    unembedding_float32 = config.vocab_size * config.hidden_size * 4
    attention_float32 = 4 * config.hidden_size * (config.qkv_size + config.num_attention_heads * config.head_dim)
    decode = programs["decode"]
    assert decode["temp_bytes"] < 2 * unembedding_float32 + 2 * attention_float32 + block_bytes
    # The cache is donated: the loop writes it in place.
    assert decode["alias_bytes"] >= decode["cache_bytes"] > 0
    assert report["fits"] == {"H100 80 GB": True, "H200 141 GB": True}
