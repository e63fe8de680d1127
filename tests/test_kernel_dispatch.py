"""The model's kernel path against its XLA path: the Pallas kernels in Mosaic GPU interpret mode
and, on a Hopper GPU, compiled (``kernel_mode``, see conftest.py).

The config has gpt-oss's attention geometry (head_dim 64, 8 query heads per KV head) and expert
sizes the MXFP4 kernel tiles (multiples of 192), at a size interpret mode runs in seconds.
"""

import contextlib
import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.config import preset
from gptoss_jax.kernel_dispatch import (
    KernelPlan,
    PartDecision,
    attention_kernel_fits,
    kernel_decisions,
    kernel_plan,
    moe_kernel_fits,
    resolve_kernels,
)
from gptoss_jax.kv_cache import KVCache
from gptoss_jax.model import GptOss
from pallas_kernels import cuda_toolchain
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention

KERNEL_CONFIG = dataclasses.replace(
    preset("tiny"), hidden_size=192, intermediate_size=384, head_dim=64,
    num_attention_heads=8, num_key_value_heads=1,
)


@pytest.fixture(scope="module")
def model_and_tokens():
    model = GptOss(KERNEL_CONFIG, kernels="xla", rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, KERNEL_CONFIG.vocab_size, (2, 20)), jnp.int32)
    return model, tokens


def errors_against_float32(model, run, kernel_mode):
    """(kernel path error, XLA bfloat16 path error), each against the float32 XLA path."""
    model.dtype, model.kernels = jnp.dtype(jnp.float32), "xla"
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
        reference = np.asarray(run(model))
    model.dtype = jnp.dtype(jnp.bfloat16)
    xla = np.asarray(run(model))
    model.kernels = "interpret" if kernel_mode == "interpret" else "pallas"
    kernel = np.asarray(run(model))
    model.kernels = "xla"
    return np.abs(kernel - reference).max(), np.abs(xla - reference).max()


def test_the_kernels_fit_this_config_and_gpt_oss():
    for config in (KERNEL_CONFIG, preset("gpt-oss-20b"), preset("gpt-oss-120b")):
        assert attention_kernel_fits(config, jnp.bfloat16)
        assert moe_kernel_fits(config, jnp.bfloat16)
    assert not moe_kernel_fits(preset("tiny"), jnp.bfloat16)  # 64 is not a multiple of 192
    assert not attention_kernel_fits(preset("tiny"), jnp.bfloat16)  # head_dim 16
    assert not moe_kernel_fits(KERNEL_CONFIG, jnp.float32)


def test_the_plan_runs_each_kernel_where_its_shapes_fit():
    experts_only = dataclasses.replace(KERNEL_CONFIG, head_dim=32)
    assert kernel_plan("pallas", KERNEL_CONFIG, jnp.bfloat16) == KernelPlan("pallas", "pallas", "pallas")
    assert kernel_plan("interpret", experts_only, jnp.bfloat16) == KernelPlan("xla", "xla", "interpret")
    assert kernel_plan("pallas", KERNEL_CONFIG, jnp.float32) == KernelPlan("xla", "xla", "xla")
    assert kernel_plan("xla", KERNEL_CONFIG, jnp.bfloat16) == KernelPlan("xla", "xla", "xla")
    assert KernelPlan("xla", "xla", "xla").describe() == "kernels xla"
    assert KernelPlan("xla", "pallas", "pallas").describe() == (
        "kernels: prefill attention xla, decode attention pallas, experts pallas")


def test_each_part_left_on_xla_says_why():
    decisions = kernel_decisions("pallas", preset("tiny"), jnp.bfloat16)
    for attention in ("prefill_attention", "decode_attention"):
        assert decisions[attention] == PartDecision("xla", "the attention kernels take head_dim 64, not 16")
    assert decisions["experts"] == PartDecision(
        "xla", "the expert kernel takes hidden and expert sizes in multiples of 192, not 64 and 96")
    assert kernel_decisions("interpret", KERNEL_CONFIG, jnp.float32)["experts"].why == (
        "the expert kernel computes in bfloat16, not float32")
    twelve_per_kv = dataclasses.replace(KERNEL_CONFIG, num_attention_heads=12)
    assert kernel_decisions("pallas", twelve_per_kv, jnp.bfloat16)["decode_attention"].why == (
        "the attention kernels take multiples of 8 query heads per KV head, not 12")
    assert kernel_decisions("pallas", KERNEL_CONFIG, jnp.bfloat16)["experts"] == PartDecision(
        "pallas", "kernels='pallas' asked for")


@pytest.mark.parametrize("ptxas, miscompiles", [
    ("Cuda compilation tools, release 12.6, V12.6.85", False),
    ("Cuda compilation tools, release 12.8, V12.8.61", True),  # CUDA 12.8.0
    ("Cuda compilation tools, release 12.9, V12.9.41", True),  # 12.9.0
    ("Cuda compilation tools, release 12.9, V12.9.86", False),  # 12.9.1: runtime 12090 like 12.9.0
    ("Cuda compilation tools, release 13.0, V13.0.88", False),
])
def test_attention_kernels_stay_off_a_miscompiling_ptxas(monkeypatch, ptxas, miscompiles):
    monkeypatch.setattr(cuda_toolchain, "ptxas_version", lambda: cuda_toolchain.parse_ptxas_version(ptxas))
    versions = types.SimpleNamespace(cuda_runtime_get_version=lambda: 12090)
    monkeypatch.setattr("jax._src.lib.cuda_versions", versions)
    assert attention_kernel_fits(KERNEL_CONFIG, jnp.bfloat16) is not miscompiles
    for jitted in (flash_attention, decode_attention):
        jitted.clear_cache()  # the check runs when a kernel is traced
    q, kv = jnp.zeros((1, 8, 8, 64), jnp.bfloat16), jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
    sinks, positions = jnp.zeros((8,)), jnp.zeros((1, 8), jnp.int32)
    options = dict(sliding_window=None, softmax_scale=0.125)
    for kernel in (functools.partial(flash_attention, q, kv, kv, sinks, **options),
                   functools.partial(decode_attention, q, kv, kv, sinks, positions, positions, **options)):
        refused = pytest.raises(NotImplementedError, match="CUDA 12.8.0 up to 12.9.0 miscompiles")
        with refused if miscompiles else contextlib.nullcontext():
            jax.eval_shape(kernel)
        jax.eval_shape(functools.partial(kernel, interpret=True))  # interpret mode compiles nothing for CUDA


@pytest.mark.parametrize("runtime, miscompiles", [(None, False), (12090, True), (13000, False)])
def test_without_a_ptxas_the_cuda_major_decides(monkeypatch, runtime, miscompiles):
    monkeypatch.setattr(cuda_toolchain, "ptxas_version", lambda: None)
    versions = None if runtime is None else types.SimpleNamespace(cuda_runtime_get_version=lambda: runtime)
    monkeypatch.setattr("jax._src.lib.cuda_versions", versions)
    assert cuda_toolchain.cuda_miscompiles_attention_masks() is miscompiles


def test_the_ptxas_version_is_read_from_the_one_mosaic_gpu_runs(monkeypatch, tmp_path):
    ptxas = tmp_path / "ptxas"
    ptxas.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.9, V12.9.86'\n")
    ptxas.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    cuda_toolchain.ptxas_version.cache_clear()
    try:
        assert cuda_toolchain.mosaic_ptxas() == str(ptxas)
        assert cuda_toolchain.ptxas_version() == (12, 9, 86)
    finally:
        cuda_toolchain.ptxas_version.cache_clear()


def test_chunked_prefill_and_decode_with_kernels_match_the_xla_path(model_and_tokens, kernel_mode):
    """Every attention kernel the model takes: the first prompt chunk runs the prefill kernel (the
    branch a forward pass without a cache takes too);
    the second, longer than the sliding window, attends over the cache (full layers) and over
    the ring plus itself (sliding layers) with the decode-attention kernel, several query blocks
    of it; then one decode step against the wrapped ring."""
    model, tokens = model_and_tokens
    split, length = 6, tokens.shape[1] - 1
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    assert length - split > KERNEL_CONFIG.sliding_window

    def prefill_in_two_chunks_then_decode(m):
        cache = KVCache.create(KERNEL_CONFIG, tokens.shape[0], 256, m.dtype)
        _, cache = m.with_cache(tokens[:, :split], positions[:, :split], cache, cache_is_empty=True)
        chunk_logits, cache = m.with_cache(tokens[:, split:length], positions[:, split:length], cache)
        decode_logits, _ = m.with_cache(tokens[:, length:], positions[:, length:], cache)
        return jnp.concatenate([chunk_logits, decode_logits], axis=1)

    kernel_error, xla_error = errors_against_float32(model, prefill_in_two_chunks_then_decode, kernel_mode)
    assert 0 < kernel_error <= 2 * xla_error


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("GPTOSS_JAX_KERNELS", raising=False)
    assert resolve_kernels("auto") == "xla"  # no GPU here
    assert resolve_kernels("interpret") == "interpret"
    monkeypatch.setenv("GPTOSS_JAX_KERNELS", "pallas")
    assert resolve_kernels("auto") == "pallas"
    assert resolve_kernels("xla") == "xla"  # an explicit choice beats the environment
    monkeypatch.setenv("GPTOSS_JAX_KERNELS", "triton")
    with pytest.raises(ValueError, match="GPTOSS_JAX_KERNELS must be one of"):
        resolve_kernels("auto")
    with pytest.raises(ValueError, match="kernels must be one of"):
        GptOss(KERNEL_CONFIG, kernels="cuda", rngs=nnx.Rngs(0))


def test_the_expert_matmul_of_each_choice():
    from gptoss_jax.kernel_dispatch import expert_matmul
    from pallas_kernels.mxfp4_moe import mxfp4_grouped_matmul
    from pallas_kernels.mxfp4_moe_reference import mxfp4_grouped_matmul_reference

    assert expert_matmul("xla") is mxfp4_grouped_matmul_reference
    # No GPU here: programs lowered for a GPU are lowered for sm_90, so pallas is the WGMMA kernel
    # (on Ampere, Ada and Blackwell GPUs the mma.sync kernel: tests/test_env.py).
    assert expert_matmul("pallas").func is mxfp4_grouped_matmul and expert_matmul("pallas").keywords == {
        "interpret": None}
    assert expert_matmul("interpret").keywords["interpret"] is not None
