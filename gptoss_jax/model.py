"""gpt-oss as a Flax NNX model, with the expert weights kept packed in MXFP4.

Names follow OpenAI's ``gpt_oss/torch/model.py`` (``attn.qkv``, ``mlp.mlp1_weight.blocks``...), and so
do the rounding points: in ``bfloat16`` every matmul accumulates in float32 and rounds its
result once, and elementwise operations round to bfloat16 as the reference's do. In ``float32``
the same graph runs without those roundings. Parameters keep the checkpoint's dtypes (bfloat16;
RMSNorm gains in float32; MXFP4 ``blocks`` and ``scales`` as uint8) whatever the compute dtype.

Shapes: ``B`` batch, ``T`` tokens, ``H`` hidden size, ``E`` experts, ``I`` expert size,
``V`` vocabulary, ``D`` head size, ``Hq``/``Hkv`` query/KV heads.

One departure from the checkpoint's layout: the rows of the fused ``attn.qkv`` projection are
grouped by KV head (see :func:`fused_qkv_order`), so that splitting them over the mesh's tensor
axis gives every device whole query groups with their keys and values.

Every parameter names its logical axes in its ``out_sharding`` metadata (``vocab``, ``experts``,
``heads``); :mod:`gptoss_jax.sharding` maps them onto a mesh. A model built with a ``mesh``
holds its parameters sharded so, and runs attention and the experts under ``shard_map``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gptoss_jax import initializers
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernel_dispatch import (
    Implementation,
    KernelChoice,
    KernelPlan,
    expert_matmul,
    interpret_params,
    kernel_plan,
    resolve_kernels,
)
from gptoss_jax.kv_cache import KVCache, LayerCache
from gptoss_jax.rope import apply_rotary, rotary_cos_sin, yarn_inverse_frequencies
from gptoss_jax.sharding import (
    BATCH, EXPERT_SHARDS, EXPERTS, HEADS, VOCAB, LogicalAxes, check_mesh, partition_spec, shard_parameters,
)
from pallas_kernels import mxfp4
from pallas_kernels.attention_reference import attention_reference
from pallas_kernels.expert_routing import combine_experts, group_by_expert
from pallas_kernels.mxfp4_moe_reference import mxfp4_grouped_matmul_reference

PARAM_DTYPE = jnp.bfloat16
# Random MXFP4 weights decode to E2M1 values (mean |v| about 2) times 2**(scale - 127);
# 2**-7 gives them a spread close to initializers.STDDEV.
_INIT_SCALE_BYTE = 120


def _param(value: jax.Array, axes: LogicalAxes) -> nnx.Param:
    """A parameter whose logical axes are ``axes``; GptOss places it on its mesh (if any) once
    built, rather than Flax as each one is made, which would need a mesh for every module."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], axes: LogicalAxes) -> nnx.Param:
    return _param(initializers.normal(rngs.params(), shape, PARAM_DTYPE), axes)


def fused_qkv_order(config: GptOssConfig) -> np.ndarray:
    """Where the model's fused QKV rows come from in the checkpoint's.

    The checkpoint orders the rows ``[q heads | k heads | v heads]``. The model orders them by
    KV head ``g``: its ``q_per_kv`` query heads ``g * q_per_kv ...``, then key head ``g``, then
    value head ``g``. Row ``i`` of the model's ``attn.qkv.weight`` (and ``.bias``) is row
    ``order[i]`` of the checkpoint's; ``np.argsort(order)`` goes back.

    Returns:
      int64 ``[(Hq + 2 Hkv) * D]``.
    """
    kv_heads, group, head_dim = config.num_key_value_heads, config.q_per_kv, config.head_dim
    q_heads = np.arange(config.num_attention_heads).reshape(kv_heads, group)
    k_heads = config.num_attention_heads + np.arange(kv_heads)[:, None]
    v_heads = k_heads + kv_heads
    heads = np.concatenate([q_heads, k_heads, v_heads], axis=1).reshape(-1)
    return (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


class Linear(nnx.Module):
    """``y = x @ weight.T + bias`` with a torch-layout ``weight [out, in]``, rounded once to x.dtype.

    ``out_axis`` is the logical axis the outputs are split on, ``in_axis`` the inputs'.
    """

    def __init__(
        self, in_features: int, out_features: int, *, use_bias: bool = True, out_axis: str | None = None,
        in_axis: str | None = None, rngs: nnx.Rngs,
    ):
        self.weight = _normal(rngs, (out_features, in_features), (out_axis, in_axis))
        self.bias = _normal(rngs, (out_features,), (out_axis,)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(x.dtype), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding ``weight [V, H]``: a plain row gather, no scaling."""

    def __init__(self, vocab_size: int, hidden_size: int, *, rngs: nnx.Rngs):
        self.weight = _normal(rngs, (vocab_size, hidden_size), (VOCAB, None))

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return self.weight[...][tokens].astype(dtype)


class MXFP4Weight(nnx.Module):
    """Expert weights ``[E, N, K]`` kept packed: ``blocks`` uint8 ``[E, N, K/32, 16]``, ``scales`` uint8 ``[E, N, K/32]``."""

    def __init__(self, experts: int, out_features: int, in_features: int, *, rngs: nnx.Rngs):
        groups = in_features // mxfp4.BLOCK_SIZE
        self.blocks = _param(
            initializers.random_bytes(rngs.params(), (experts, out_features, groups, mxfp4.BYTES_PER_BLOCK)),
            (EXPERTS, None, None, None),
        )
        self.scales = _param(jnp.full((experts, out_features, groups), _INIT_SCALE_BYTE, jnp.uint8), (EXPERTS, None, None))
        self.decoded: DecodedExperts | None = nnx.data(None)

    def decode(self) -> None:
        """Keep a decoded copy ``[E, N, K]`` that the XLA path reads instead of the packed bytes.

        The copy is bfloat16, which holds every MXFP4 value exactly, so float32 compute reads
        half the bytes it would in float32 and gets the same values.
        """
        self.decoded = DecodedExperts(mxfp4.dequantize(self.blocks[...], self.scales[...], jnp.bfloat16))


class DecodedExperts(nnx.Variable):
    """Expert weights decoded from MXFP4 (:meth:`GptOss.decode_experts`): a copy, never a parameter (never saved)."""


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a float32 gain and no offset: ``[..., H]``."""

    def __init__(self, size: int, eps: float):
        self.scale = _param(jnp.ones((size,), jnp.float32), (None,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        t = x.astype(jnp.float32)
        t = t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + self.eps)
        return (t * self.scale[...]).astype(x.dtype)


class AttentionBlock(nnx.Module):
    """Pre-norm grouped-query attention with YaRN RoPE, learned sinks and, on even layers, a window."""

    def __init__(self, config: GptOssConfig, layer: int, *, mesh: Mesh | None = None, rngs: nnx.Rngs):
        self.config = config
        self.mesh = mesh
        self.sliding_window = config.sliding_window if config.is_sliding(layer) else None
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.qkv = Linear(config.hidden_size, config.qkv_size, out_axis=HEADS, rngs=rngs)
        self.sinks = _param(jax.random.normal(rngs.params(), (config.num_attention_heads,)).astype(PARAM_DTYPE), (HEADS,))
        self.out = Linear(config.num_attention_heads * config.head_dim, config.hidden_size, in_axis=HEADS, rngs=rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, kernels: KernelPlan, cache: LayerCache | None,
        cache_is_empty: bool = False,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Attend over the cache and this chunk.

        Args:
          x: ``[B, T, H]``.
          positions: int32 ``[B, T]`` absolute positions; negative marks padding.
          kernels: the model's :class:`~gptoss_jax.kernel_dispatch.KernelPlan`, which checked the
            shapes: its ``prefill_attention`` and ``decode_attention`` run attention.
          cache: this layer's cache, or None for a forward pass over positions 0..T-1.
          cache_is_empty: the cache holds nothing yet and this chunk starts at position 0 (a
            prompt's first chunk), so it attends within itself only, like a forward pass.

        Returns:
          ``([B, T, H]`` before the residual add, the cache with this chunk written).
        """
        config = self.config
        batch, length, _ = x.shape
        kv_heads, group, head_dim = config.num_key_value_heads, config.q_per_kv, config.head_dim
        qkv = self.qkv(self.norm(x)).reshape(batch, length, kv_heads, group + 2, head_dim)  # fused_qkv_order
        q = qkv[:, :, :, :group].reshape(batch, length, config.num_attention_heads, head_dim)
        k = qkv[:, :, :, group]
        v = qkv[:, :, :, group + 1]
        inverse_frequencies, concentration = yarn_inverse_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling_factor,
            config.initial_context_length, config.rope_ntk_alpha, config.rope_ntk_beta,
        )
        cos, sin = rotary_cos_sin(positions, inverse_frequencies, concentration, x.dtype)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        attend = functools.partial(self._attend, kernels=kernels, cache_is_empty=cache_is_empty)
        sinks = self.sinks[...].astype(jnp.float32)
        if self.mesh is None:
            out, cache = attend(q, k, v, sinks, positions, cache)
        else:
            # Heads and their cache stay on their tensor shard, rows on their data shard: the
            # attention kernels see a whole, smaller problem.
            heads = partition_spec(BATCH, None, HEADS, None)
            rows = partition_spec(BATCH, None)
            cache_spec = None if cache is None else LayerCache(heads, heads, rows)
            out, cache = jax.shard_map(
                attend, mesh=self.mesh, in_specs=(heads, heads, heads, partition_spec(HEADS), rows, cache_spec),
                out_specs=(heads, cache_spec), check_vma=False,
            )(q, k, v, sinks, positions, cache)
        return self.out(out.reshape(batch, length, config.num_attention_heads * head_dim)), cache

    def _attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, positions: jax.Array,
        cache: LayerCache | None, *, kernels: KernelPlan, cache_is_empty: bool,
    ) -> tuple[jax.Array, LayerCache | None]:
        options = dict(sliding_window=self.sliding_window, softmax_scale=self.config.head_dim ** -0.5)
        if cache is None or cache_is_empty:
            # Right-padding needs no mask here: a padded key comes after every real query.
            if kernels.prefill_attention != "xla":
                from pallas_kernels.flash_attention import flash_attention

                out = flash_attention(q, k, v, sinks, interpret=interpret_params(kernels.prefill_attention), **options)
            else:
                out = attention_reference(q, k, v, sinks, positions, positions, **options)
            return out, None if cache is None else cache.write(k, v, positions)
        if q.shape[1] == 1 or self.sliding_window is None:
            # A full layer's cache has a slot for every position, and one new token evicts only
            # a key that has left its window: write first, then attend over the cache.
            cache = cache.write(k, v, positions)
            keys, values, key_positions = cache
        else:
            # A chunk in a ring: its own writes could evict keys its earlier tokens still see,
            # so attend over the ring as it was plus the chunk, then write.
            keys = jnp.concatenate([cache.keys, k.astype(cache.keys.dtype)], axis=1)
            values = jnp.concatenate([cache.values, v.astype(cache.values.dtype)], axis=1)
            key_positions = jnp.concatenate([cache.positions, positions], axis=1)
            cache = cache.write(k, v, positions)
        if kernels.decode_attention != "xla":
            from pallas_kernels.decode_attention import decode_attention

            attend = functools.partial(decode_attention, interpret=interpret_params(kernels.decode_attention))
        else:
            attend = attention_reference
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        return attend(q, keys, values, sinks, positions, key_positions, **options), cache


def route(router_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Pick each token's experts: top-k of the logits first, then a softmax over those k only.

    Args:
      router_logits: ``[tokens, E]``.
      k: experts per token.

    Returns:
      ``(weights [tokens, k] in the logits' dtype, expert indices int32 [tokens, k])``, in
      descending logit order; the weights of a token sum to one.
    """
    top_logits, expert_indices = jax.lax.top_k(router_logits, k)
    weights = jax.nn.softmax(top_logits.astype(jnp.float32), axis=-1).astype(router_logits.dtype)
    return weights, expert_indices


class MLPBlock(nnx.Module):
    """Pre-norm mixture of experts: top-k router, then softmax over the k, MXFP4 experts."""

    def __init__(self, config: GptOssConfig, *, mesh: Mesh | None = None, rngs: nnx.Rngs):
        self.config = config
        self.mesh = mesh
        experts, hidden, inner = config.num_experts, config.hidden_size, config.intermediate_size
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.gate = Linear(hidden, experts, rngs=rngs)
        # mlp1 maps H to 2I outputs interleaved gate (even) / linear (odd); mlp2 maps I to H.
        self.mlp1_weight = MXFP4Weight(experts, 2 * inner, hidden, rngs=rngs)
        self.mlp1_bias = _normal(rngs, (experts, 2 * inner), (EXPERTS, None))
        self.mlp2_weight = MXFP4Weight(experts, hidden, inner, rngs=rngs)
        self.mlp2_bias = _normal(rngs, (experts, hidden), (EXPERTS, None))

    def __call__(self, x: jax.Array, kernels: Implementation) -> jax.Array:
        """``x [B, T, H]`` -> ``[B, T, H]`` (before the residual add).

        ``kernels`` runs the expert matmuls: the experts of the model's
        :class:`~gptoss_jax.kernel_dispatch.KernelPlan`, which checked the shapes.
        """
        config = self.config
        batch, length, hidden = x.shape
        t = self.norm(x).reshape(batch * length, hidden)
        routing_weights, expert_indices = route(self.gate(t), config.experts_per_token)
        mlp1_matmul = mlp2_matmul = expert_matmul(kernels)
        if self.mlp1_weight.decoded is not None and mlp1_matmul is mxfp4_grouped_matmul_reference:
            mlp1_matmul = functools.partial(mlp1_matmul, decoded=self.mlp1_weight.decoded[...])
            mlp2_matmul = functools.partial(mlp2_matmul, decoded=self.mlp2_weight.decoded[...])
        experts = functools.partial(_local_experts, mlp1_matmul=mlp1_matmul, mlp2_matmul=mlp2_matmul,
                                    swiglu_limit=config.swiglu_limit)
        weights = (self.mlp1_weight.blocks[...], self.mlp1_weight.scales[...], self.mlp1_bias[...],
                   self.mlp2_weight.blocks[...], self.mlp2_weight.scales[...], self.mlp2_bias[...])
        if self.mesh is None:
            out = experts(t, routing_weights, expert_indices, *weights, first_expert=0)
        else:
            out = jax.shard_map(
                functools.partial(_expert_parallel, experts=experts), mesh=self.mesh,
                in_specs=(partition_spec(BATCH, None),) * 3 + (partition_spec(EXPERTS),) * 6,
                out_specs=partition_spec(BATCH, None), check_vma=False,
            )(t, routing_weights, expert_indices, *weights)
        return out.astype(x.dtype).reshape(batch, length, hidden)


def _local_experts(
    tokens: jax.Array, routing_weights: jax.Array, expert_indices: jax.Array, mlp1_blocks: jax.Array,
    mlp1_scales: jax.Array, mlp1_bias: jax.Array, mlp2_blocks: jax.Array, mlp2_scales: jax.Array,
    mlp2_bias: jax.Array, *, first_expert: jax.Array | int, mlp1_matmul, mlp2_matmul, swiglu_limit: float,
) -> jax.Array:
    """The experts ``first_expert ... first_expert + E_local - 1`` held here, on the tokens routed to them.

    Args:
      tokens: ``[N, H]`` normed hidden states.
      routing_weights: ``[N, k]``; expert_indices: int32 ``[N, k]`` global expert ids.
      mlp1_*, mlp2_*: the local experts' weights, ``E_local`` on their leading axis.
      first_expert: the global id of local expert 0.
      mlp1_matmul, mlp2_matmul: the grouped matmul of each (the Pallas kernel or its XLA reference).
      swiglu_limit: the clamp of mlp1's SwiGLU (the config's).

    Returns:
      float32 ``[N, H]``: each token's weighted sum over those of its experts held here.
    """
    local_experts = mlp1_blocks.shape[0]
    local_indices = expert_indices - first_expert
    # Assignments to other devices' experts sort last, past the local groups, where the grouped
    # matmul writes zeros.
    local_indices = jnp.where((local_indices >= 0) & (local_indices < local_experts), local_indices, local_experts)
    groups = group_by_expert(local_indices, local_experts + 1)
    group_sizes = groups.group_sizes[:local_experts]
    activations = mlp1_matmul(
        tokens[groups.token_index], group_sizes, mlp1_blocks, mlp1_scales, mlp1_bias, epilogue="bias_swiglu",
        swiglu_limit=swiglu_limit,
    )
    weighted = mlp2_matmul(
        activations, group_sizes, mlp2_blocks, mlp2_scales, mlp2_bias, epilogue="bias",
        row_weights=routing_weights.reshape(-1)[groups.assignment_order],
    )
    return combine_experts(weighted, groups, expert_indices.shape[1], jnp.float32)


def _expert_parallel(tokens: jax.Array, routing_weights: jax.Array, expert_indices: jax.Array, *weights: jax.Array,
                     experts) -> jax.Array:
    """One device's share of the MoE: its experts on its data shard's tokens, summed over the experts' devices.

    Every device of an expert group holds the same tokens (attention leaves them replicated
    there), so no token has to travel: each computes only the rows routed to its experts, and one
    float32 all-reduce adds the partial sums, which then round once as on a single device.
    """
    first_expert = jax.lax.axis_index(EXPERT_SHARDS) * weights[0].shape[0]
    partial_sums = experts(tokens, routing_weights, expert_indices, *weights, first_expert=first_expert)
    return jax.lax.psum(partial_sums, EXPERT_SHARDS)


class TransformerBlock(nnx.Module):
    """One layer: attention then mixture of experts, each added to the residual stream."""

    def __init__(self, config: GptOssConfig, layer: int, *, mesh: Mesh | None = None, rngs: nnx.Rngs):
        self.attn = AttentionBlock(config, layer, mesh=mesh, rngs=rngs)
        self.mlp = MLPBlock(config, mesh=mesh, rngs=rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, kernels: KernelPlan, cache: LayerCache | None,
        cache_is_empty: bool = False,
    ) -> tuple[jax.Array, LayerCache | None]:
        attended, cache = self.attn(x, positions, kernels, cache, cache_is_empty)
        x = x + attended
        return x + self.mlp(x, kernels.experts), cache


class GptOss(nnx.Module):
    """The gpt-oss transformer.

    Args:
      config: the hyperparameters.
      dtype: compute dtype, ``bfloat16`` (the reference's numerics) or ``float32``.
      kernels: ``auto`` (Pallas on Hopper GPUs, XLA elsewhere), ``pallas``, ``xla``, or
        ``interpret`` (the Pallas kernels in Mosaic GPU interpret mode, on the CPU).
      mesh: a mesh from :func:`gptoss_jax.sharding.make_mesh`: the parameters are placed on it
        by their sharding metadata, and attention and the experts run sharded. None: one device.
      rngs: random initialization; use :func:`gptoss_jax.load` for real weights.

    Example::

        model = GptOss(preset("tiny"), rngs=nnx.Rngs(0))
        logits = model(jnp.array([[1, 2, 3]]))  # float32 [1, 3, vocab]
    """

    def __init__(
        self,
        config: GptOssConfig,
        *,
        dtype: jnp.dtype = jnp.bfloat16,
        kernels: KernelChoice = "auto",
        mesh: Mesh | None = None,
        rngs: nnx.Rngs,
    ):
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
            raise ValueError(f"dtype must be bfloat16 or float32, got {jnp.dtype(dtype).name}")
        resolve_kernels(kernels)  # reject a bad name now rather than at the first call
        if mesh is not None:
            check_mesh(mesh, config)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.kernels = kernels
        self.mesh = mesh
        self.embedding = Embedding(config.vocab_size, config.hidden_size, rngs=rngs)
        # Named `block` like the reference, so parameter paths read as checkpoint names.
        self.block = nnx.List([
            TransformerBlock(config, layer, mesh=mesh, rngs=rngs) for layer in range(config.num_hidden_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.unembedding = Linear(config.hidden_size, config.vocab_size, use_bias=False, out_axis=VOCAB, rngs=rngs)
        if mesh is not None:
            shard_parameters(self, mesh)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits of whole sequences (positions 0..T-1), without a cache.

        Args:
          tokens: int32 ``[B, T]``.

        Returns:
          float32 ``[B, T, V]`` (rounded to the compute dtype first, as the reference does).
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x, _ = self._blocks(tokens, positions, None)
        return self.unembedding(self.norm(x)).astype(jnp.float32)

    def decode_experts(self) -> None:
        """Keep a decoded copy of every expert's weights, which the XLA path then reads.

        Opt-in, for CPU runs: the XLA path otherwise decodes the MXFP4 bytes of each active expert
        at every step, which dominates a CPU decode step. The bfloat16 copy costs about 4x the
        experts' packed bytes (what transformers holds after dequantizing MXFP4 on the CPU); the
        Pallas kernels never read it.
        """
        if self.mesh is not None:
            raise ValueError("decoded experts are for a single device; a sharded model keeps them packed")
        for block in self.block:
            block.mlp.mlp1_weight.decode()
            block.mlp.mlp2_weight.decode()

    def with_cache(
        self, tokens: jax.Array, positions: jax.Array, cache: KVCache, logits_index: jax.Array | None = None,
        cache_is_empty: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Run a chunk of new tokens against a KV cache (prefill chunks and decode steps).

        Args:
          tokens: int32 ``[B, T]``.
          positions: int32 ``[B, T]`` absolute positions; negative marks padding, which is
            neither cached nor attended to.
          cache: the cache holding every earlier position.
          logits_index: optional int32 ``[B]``: return only the logits at this index of each
            row (``[B, V]``), which spares the unembedding of a whole prompt.
          cache_is_empty: (static) the cache is fresh and the chunk starts at position 0, so
            attention stays within the chunk, where the prefill kernel runs.

        Returns:
          (float32 logits ``[B, T, V]`` or ``[B, V]``, the cache with the chunk written).
        """
        x, cache = self._blocks(tokens, positions, cache, cache_is_empty)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
        return self.unembedding(self.norm(x)).astype(jnp.float32), cache

    def _blocks(
        self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None, cache_is_empty: bool = False
    ) -> tuple[jax.Array, KVCache | None]:
        kernels = kernel_plan(self.kernels, self.config, self.dtype)
        if self.mesh is not None and tokens.shape[0] % self.mesh.shape["data"]:
            raise ValueError(
                f"batch {tokens.shape[0]} does not divide over the mesh's data axis of {self.mesh.shape['data']}"
            )
        x = self.embedding(tokens, self.dtype)
        layer_caches = []
        for layer, block in enumerate(self.block):
            layer_cache = None if cache is None else cache.layers[layer]
            x, layer_cache = block(x, positions, kernels, layer_cache, cache_is_empty)
            layer_caches.append(layer_cache)
        return x, None if cache is None else KVCache(tuple(layer_caches))


