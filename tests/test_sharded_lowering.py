"""Sharded gpt-oss lowers for CUDA with a Pallas kernel for every attention and expert call, at
one device's shapes, on every default and documented mesh of 2, 4 and 8 devices.

``benchmarks/kernels/sharded_kernels.py`` does the lowering (two layers of gpt-oss-20b's and -120b's
widths, abstract sharded parameters, a decode step and a prompt's first chunk, exported for
``cuda``) in one subprocess with 8 CPU devices; the tests assert on its JSON report. On these
meshes no part falls back to XLA: a device keeps whole KV groups (8 query heads per KV head, as
the attention kernels need) and whole experts of 2880 x 2880, as the expert kernel needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.kernels import sharded_kernels
from gptoss_jax.config import preset

REPO = Path(__file__).resolve().parents[1]
ATTENTION_KERNEL = {"decode": "decode_attention", "prefill": "flash_attention"}
EXPERT_KERNEL = "mxfp4_grouped_matmul"


@pytest.fixture(scope="module")
def lowerings() -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={sharded_kernels.DEVICES}")
    result = subprocess.run([sys.executable, "-m", "benchmarks.kernels.sharded_kernels", "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_the_meshes_are_the_defaults_and_the_documented_ones(lowerings):
    labels = [sharded_kernels.mesh_label(sizes) for sizes in sharded_kernels.meshes()]
    assert labels == ["tensor=2", "tensor=4", "tensor=8", "expert=2,tensor=4", "expert=2,tensor=2",
                      "expert=4,tensor=2", "data=2,expert=2,tensor=2"]
    lowered = [(sharded_kernels.mesh_label(e["mesh"]), e["model"], e["step"]) for e in lowerings]
    assert lowered == [(label, model, step) for label in labels for model in sharded_kernels.MODELS
                       for step in ("decode", "prefill")]


@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_every_attention_and_expert_call_is_a_mosaic_gpu_kernel(lowerings, step):
    for entry in (e for e in lowerings if e["step"] == step):
        where = (entry["model"], entry["mesh"])
        assert entry["plan"] == dict.fromkeys(("prefill_attention", "decode_attention", "experts"), "pallas"), where
        functions = [call["function"] for call in entry["calls"]]
        assert functions == [ATTENTION_KERNEL[step], EXPERT_KERNEL, EXPERT_KERNEL] * sharded_kernels.LOWERED_LAYERS
        assert all(call["kernels_inside"] == 1 for call in entry["calls"]), where
        # One custom call per distinct kernel: each layer kind's attention and the two expert
        # matmuls, which both layers share.
        assert entry["mosaic_calls"] == 4, where


def test_each_kernel_gets_one_devices_share(lowerings):
    for entry in lowerings:
        sizes, step = entry["mesh"], entry["step"]
        shard = sharded_kernels.shard_config(preset(entry["model"]), sizes)
        rows = sharded_kernels.step_batch(step, sizes) // sizes["data"]
        tokens = 1 if step == "decode" else sharded_kernels.PREFILL_TOKENS
        attention, mlp1, mlp2 = entry["calls"][:3]
        q, k = attention["shapes"][:2]
        assert q == [rows, tokens, shard.num_attention_heads, shard.head_dim], (entry["mesh"], step)
        assert k[0] == rows and k[2:] == [shard.num_key_value_heads, shard.head_dim]
        for call, n in ((mlp1, 2 * shard.intermediate_size), (mlp2, shard.hidden_size)):
            lhs, group_sizes, blocks = call["shapes"][:3]
            # Every token of the data shard comes to every expert device, once per routed expert.
            assert lhs[0] == rows * tokens * shard.experts_per_token
            assert group_sizes == [shard.num_experts] and blocks[:2] == [shard.num_experts, n]


def test_the_documented_table_is_the_tools(lowerings):
    documented = (REPO / "docs" / "multi-gpu.md").read_text()
    assert sharded_kernels.table(lowerings) in documented, "run python -m benchmarks.kernels.sharded_kernels for the table"
