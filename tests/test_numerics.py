"""The numerics other gpt-oss ports got wrong, each against an independent reference.

Window edges, sinks, YaRN frequencies, the gate/linear interleave and clamps, top-k before
softmax, and an expert MLP against Hugging Face's ``GptOssExperts`` (hidden size != expert size,
so a missing transpose cannot hide).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from gptoss_jax.config import GptOssConfig, preset
from gptoss_jax.model import MLPBlock, RMSNorm, route
from gptoss_jax.rope import yarn_correction_range, yarn_inverse_frequencies
from pallas_kernels import mxfp4
from pallas_kernels.attention_reference import attention_reference, visible_keys
from pallas_kernels.mxfp4_moe_reference import clamped_swiglu


def attention_float64(q, k, v, sinks, window):
    """Textbook sink attention in float64 over positions 0..T-1: [T, Hq, D] -> [T, Hq, D]."""
    q, k, v, sinks = (np.asarray(a, np.float64) for a in (q, k, v, sinks))
    length, q_heads, head_dim = q.shape
    group = q_heads // k.shape[1]
    out = np.zeros_like(q)
    for h in range(q_heads):
        scores = q[:, h] @ k[:, h // group].T / np.sqrt(head_dim)
        query, key = np.indices(scores.shape)
        visible = key <= query
        if window is not None:
            visible &= key > query - window
        scores = np.where(visible, scores, -np.inf)
        top = np.maximum(scores.max(-1, keepdims=True), sinks[h])
        weights = np.exp(scores - top)
        weights /= weights.sum(-1, keepdims=True) + np.exp(sinks[h] - top)
        out[:, h] = weights @ v[:, h // group]
    return out


def test_window_of_128_keys_includes_the_current_token():
    positions = jnp.arange(300, dtype=jnp.int32)[None]
    visible = np.asarray(visible_keys(positions, positions, sliding_window=128))[0]
    query = 260
    assert visible[query, query] and visible[query, query - 127]
    assert not visible[query, query - 128] and not visible[query, query - 129]
    assert visible[query].sum() == 128
    assert not visible[query, query + 1]
    assert visible[100, 0] and visible[100].sum() == 101  # before the window fills


@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("sink_scale", [0.0, 20.0])
def test_attention_against_float64_with_large_sinks(window, sink_scale):
    rng = np.random.default_rng(0)
    length, q_heads, kv_heads, head_dim = 300, 4, 2, 16
    q = rng.standard_normal((length, q_heads, head_dim)).astype(np.float32) * 2
    k = rng.standard_normal((length, kv_heads, head_dim)).astype(np.float32) * 2
    v = rng.standard_normal((length, kv_heads, head_dim)).astype(np.float32)
    sinks = (np.array([1.0, -1.0, 0.5, -0.25]) * sink_scale).astype(np.float32)
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    got = attention_reference(
        jnp.asarray(q)[None], jnp.asarray(k)[None], jnp.asarray(v)[None], jnp.asarray(sinks),
        positions, positions, sliding_window=window, softmax_scale=head_dim ** -0.5,
    )[0]
    np.testing.assert_allclose(np.asarray(got), attention_float64(q, k, v, sinks, window), atol=2e-5)


def test_a_large_sink_absorbs_attention():
    # The sink is one more logit in the denominator and adds no value: with sink = +20 the
    # output all but vanishes, with -20 it is plain softmax attention.
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 5, 1, 8)), jnp.float32) for _ in range(3))
    positions = jnp.arange(5, dtype=jnp.int32)[None]

    def run(sink):
        return attention_reference(q, k, v, jnp.array([sink]), positions, positions,
                                   sliding_window=None, softmax_scale=8 ** -0.5)

    assert float(jnp.abs(run(20.0)).max()) < 1e-6
    plain = attention_float64(q[0], k[0], v[0], np.array([-np.inf]), None)
    np.testing.assert_allclose(np.asarray(run(-20.0)[0]), plain, atol=1e-6)


# Spec appendix A: YaRN inverse frequencies of gpt-oss (float64; the reference uses float32).
APPENDIX_A = {
    0: 1.0, 1: 6.8904430589e-01, 2: 4.7478205548e-01, 3: 3.2714587186e-01, 4: 2.2541800020e-01,
    5: 1.5532298948e-01, 6: 1.0702442148e-01, 7: 7.3744568210e-02, 8: 5.0813274815e-02,
    9: 3.1705696185e-02, 10: 1.9335001127e-02, 11: 1.1592049256e-02, 12: 6.7949594897e-03,
    13: 3.8603593172e-03, 14: 2.0937923790e-03, 15: 1.0526021014e-03, 16: 4.5648391922e-04,
    17: 1.2931870125e-04, 18: 3.8308812374e-05, 31: 3.0235114281e-07,
}


def test_yarn_frequencies_match_the_spec_table():
    config = preset("gpt-oss-20b")
    low, high = yarn_correction_range(64, 150000, 4096, 1.0, 32.0)
    assert low == pytest.approx(8.092779115512402) and high == pytest.approx(17.39802450158856)
    inverse_frequencies, concentration = yarn_inverse_frequencies(
        config.head_dim, config.rope_theta, config.rope_scaling_factor,
        config.initial_context_length, config.rope_ntk_alpha, config.rope_ntk_beta,
    )
    assert concentration == pytest.approx(1.3465735902799727)
    for i, expected in APPENDIX_A.items():
        assert inverse_frequencies[i] == pytest.approx(expected, rel=2e-6), i


def test_swiglu_interleave_and_clamps():
    gate = np.array([-9.0, -1.0, 0.5, 3.0, 7.5, 20.0], np.float32)
    linear = np.array([-20.0, -7.5, 0.0, 2.0, 7.5, 9.0], np.float32)
    interleaved = np.stack([gate, linear], axis=-1).reshape(-1)  # gate even, linear odd
    got = np.asarray(clamped_swiglu(jnp.asarray(interleaved)))
    clamped_gate = np.minimum(gate, 7.0)  # from above only
    clamped_linear = np.clip(linear, -7.0, 7.0)
    expected = clamped_gate / (1 + np.exp(-1.702 * clamped_gate)) * (clamped_linear + 1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_top_k_comes_before_softmax():
    logits = jnp.array([[4.0, 1.0, 3.0, -2.0, 0.0]])
    weights, indices = route(logits, k=2)
    np.testing.assert_array_equal(np.asarray(indices), [[0, 2]])
    # Softmax over the two selected logits only: they sum to one.
    np.testing.assert_allclose(np.asarray(weights), [[1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))]], rtol=1e-6)


def test_rmsnorm_uses_the_gain_as_stored():
    norm = RMSNorm(4, eps=1e-5)
    norm.scale[...] = jnp.array([2.0, 1.0, 0.5, 0.0])
    x = jnp.array([[1.0, -1.0, 1.0, -1.0]])
    np.testing.assert_allclose(np.asarray(norm(x)), [[2.0, -1.0, 0.5, 0.0]], rtol=1e-5)


@pytest.mark.parametrize("swiglu_limit", [7.0, 3.5])  # gpt-oss's, and another config's
def test_expert_mlp_matches_transformers_gpt_oss_experts(swiglu_limit):
    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

    config: GptOssConfig = dataclasses.replace(preset("tiny"), swiglu_limit=swiglu_limit)
    mlp = MLPBlock(config, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(3)
    # Large activations so the clamps are exercised.
    mlp.mlp1_bias[...] = jnp.asarray(rng.uniform(-12, 12, mlp.mlp1_bias.shape), jnp.bfloat16)
    tokens = rng.standard_normal((1, 24, config.hidden_size)).astype(np.float32) * 3
    ours = np.asarray(mlp(jnp.asarray(tokens), kernels="xla"))

    hf_config = HFConfig(
        num_local_experts=config.num_experts, num_experts_per_tok=config.experts_per_token,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size, swiglu_limit=swiglu_limit,
    )
    experts, router = GptOssExperts(hf_config), GptOssTopKRouter(hf_config)

    def torch_of(array, transpose=False):
        array = np.asarray(jnp.asarray(array, jnp.float32))
        return torch.tensor(np.swapaxes(array, -1, -2) if transpose else array)

    with torch.no_grad():
        # HF keeps dequantized expert weights transposed: gate_up_proj is [E, H, 2I].
        experts.gate_up_proj.copy_(torch_of(mxfp4.dequantize(mlp.mlp1_weight.blocks[...], mlp.mlp1_weight.scales[...], jnp.float32), transpose=True))
        experts.down_proj.copy_(torch_of(mxfp4.dequantize(mlp.mlp2_weight.blocks[...], mlp.mlp2_weight.scales[...], jnp.float32), transpose=True))
        experts.gate_up_proj_bias.copy_(torch_of(mlp.mlp1_bias[...]))
        experts.down_proj_bias.copy_(torch_of(mlp.mlp2_bias[...]))
        router.weight.copy_(torch_of(mlp.gate.weight[...]))
        router.bias.copy_(torch_of(mlp.gate.bias[...]))
        normed = torch_of(mlp.norm(jnp.asarray(tokens))[0])
        _, scores, indices = router(normed)
        expected = experts(normed, router_indices=indices, routing_weights=scores).numpy()
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(ours[0], expected, atol=2e-5 * np.abs(expected).max())
