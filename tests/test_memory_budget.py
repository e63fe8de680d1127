"""Memory from shapes and from the compiler (benchmarks/memory/budget.py): the goals, and bounded programs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from benchmarks.memory import budget
from benchmarks.gpu.gpu_session import GenerateCase
from benchmarks.kernels.sass_tools import installed_tools
from gptoss_jax import footprint
from gptoss_jax.config import preset
from gptoss_jax.kv_cache import cache_bytes


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


# XLA's GPU compiler on the CPU (benchmarks/gpu/gpu_targets.py): the tools kernel_sass installs (CI
# installs them first), in a process started with them on its paths.
deviceless_tools = installed_tools()
needs_deviceless_gpu = pytest.mark.skipif(
    deviceless_tools is None, reason="the CUDA plugin and stand-in driver are not installed "
                                     "(python -m benchmarks.kernels.kernel_sass installs them)")

_DEVICELESS_FIGURES = """
import dataclasses, json
from benchmarks.gpu import gpu_targets
from benchmarks.memory import budget
from benchmarks.throughput import moe_reference
from benchmarks.gpu.gpu_session import GenerateCase
from gptoss_jax.config import preset

decode_matmul = moe_reference.gpu_temporaries(gpu_targets.gpu_target("RTX 4090"), ["mlp1"], [8])[0]
device = gpu_targets.compile_only_device(gpu_targets.gpu_target("L4"))
config = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=2)
[decode] = budget.generate_memory(config, GenerateCase("gpt-oss-20b", "xla", 1, 1024, 256), only=["decode"],
                                  device=device)
print(json.dumps({"decode_matmul": decode_matmul, "decode": dataclasses.asdict(decode),
                  "device_kind": device.device_kind}))
"""


@pytest.fixture(scope="module")
def deviceless_figures():
    """gpt-oss-20b's decode matmul compiled for an RTX 4090, and two of its layers' decode loop for an L4."""
    done = subprocess.run([sys.executable, "-c", _DEVICELESS_FIGURES], env=deviceless_tools.environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@needs_deviceless_gpu
def test_the_xla_decode_matmul_on_a_gpu_holds_one_decoded_expert_at_a_time(deviceless_figures):
    # 8 tokens of gpt-oss-20b's mlp1 (32 rows, top-4 of 32 experts): a gather of every row's
    # decoded expert held bf16[32, 5760, 2880], 1.08 GB of temporaries. Both forms now hold
    # about one expert (33 MB in bf16).
    expert_bytes = 5760 * 2880 * 2
    figures = deviceless_figures["decode_matmul"]
    assert figures["by_expert"] < 1.5 * expert_bytes and figures["per_row"] < 1.5 * expert_bytes


@needs_deviceless_gpu
def test_a_gpu_compile_holds_no_float32_weight_copies(deviceless_figures):
    # The CPU's decode loop holds float32 copies of the unembedding and the attention weights
    # (test above); the GPU compiler multiplies bf16 weights as they are, so two layers' decode
    # holds less than one float32 unembedding, and the programs are the GPU's.
    decode = deviceless_figures["decode"]
    assert deviceless_figures["device_kind"] == "NVIDIA L4"
    config = preset("gpt-oss-20b")
    assert decode["temp_bytes"] < config.vocab_size * config.hidden_size * 4
    two_layers = dataclasses.replace(config, num_hidden_layers=2)
    assert decode["alias_bytes"] >= cache_bytes(two_layers, 1, decode["cache_length"]) > 0  # the cache is donated
