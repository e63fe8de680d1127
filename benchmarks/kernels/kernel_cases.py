"""The kernel cases of :mod:`benchmarks.kernels.kernel_sass` and :mod:`benchmarks.kernels.kernel_cost`: one Pallas kernel at
one shape and config, which lowers itself for ``cuda``.

:func:`gpt_oss_cases` gives gpt-oss's own shapes (on one GPU), :func:`shard_cases` one device's
shapes on each mesh of :mod:`benchmarks.kernels.sharded_kernels`, :func:`variant_cases` the kernels'
non-default configs (kept for a GPU sweep to decide) at decode shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class MoeCase:
    """The MXFP4 expert matmul for one layer's tokens: ``[tokens * top_k, k] x [experts, n, k]``.

    ``mlp1`` is the bias + SwiGLU matmul (n = 2 * expert size), ``mlp2`` the bias + routing-weight
    one (n = hidden size, k = expert size).
    """

    model: str
    matmul: Literal["mlp1", "mlp2"]
    tokens: int
    experts: int
    n: int
    k: int
    top_k: int = 4
    config: Any = None  # pallas_kernels.mxfp4_moe.Config; None for its defaults

    kernel = "moe"
    arch = "9.0"  # the compute capability it is compiled for: the WGMMA kernel is Hopper's

    @property
    def name(self) -> str:
        return f"moe {self.model} {self.matmul} tokens={self.tokens}" + config_suffix(self.config)

    @property
    def epilogue(self) -> str:
        return "bias_swiglu" if self.matmul == "mlp1" else "bias"

    def weight_bytes_per_step(self) -> int:
        """Packed weight bytes one pipeline step (one main-loop iteration) decodes per CTA."""
        from pallas_kernels.mxfp4_moe import BLOCK_N

        halves = 2 if self.matmul == "mlp1" else 1
        return halves * BLOCK_N * self.kernel_config().block_kb

    def kernel_config(self) -> Any:
        from pallas_kernels.mxfp4_moe import Config

        return self.config or Config()

    def kernel_function(self) -> Callable:
        from pallas_kernels.mxfp4_moe import mxfp4_grouped_matmul

        return mxfp4_grouped_matmul

    def export(self) -> None:
        import jax
        import jax.numpy as jnp

        rows, blocks = self.tokens * self.top_k, self.k // 32
        shapes = [
            jax.ShapeDtypeStruct((rows, self.k), jnp.bfloat16),
            jax.ShapeDtypeStruct((self.experts,), jnp.int32),
            jax.ShapeDtypeStruct((self.experts, self.n, blocks, 16), jnp.uint8),
            jax.ShapeDtypeStruct((self.experts, self.n, blocks), jnp.uint8),
            jax.ShapeDtypeStruct((self.experts, self.n), jnp.bfloat16),
        ]
        if self.matmul == "mlp2":
            shapes.append(jax.ShapeDtypeStruct((rows,), jnp.float32))
        kernel = self.kernel_function()

        def matmul(lhs, group_sizes, blocks, scales, bias, row_weights=None):
            return kernel(lhs, group_sizes, blocks, scales, bias, epilogue=self.epilogue,
                          row_weights=row_weights, config=self.config)

        with lowering_for(self.arch):
            jax.export.export(jax.jit(matmul), platforms=["cuda"])(*shapes)


@dataclasses.dataclass(frozen=True)
class MmaMoeCase(MoeCase):
    """The ``mma.sync`` expert matmul (:mod:`pallas_kernels.mxfp4_moe_mma`) compiled for a GPU of
    compute capability ``arch`` (``"8.9"``: RTX 4090, L4)."""

    arch: str = "8.9"

    kernel = "moe_mma"

    @property
    def name(self) -> str:
        return (f"moe-mma {sm_name(self.arch)} {self.model} {self.matmul} tokens={self.tokens}"
                + config_suffix(self.config))

    def kernel_config(self) -> Any:
        from pallas_kernels.mxfp4_moe_mma import Config

        return self.config or Config()

    def kernel_function(self) -> Callable:
        from pallas_kernels.mxfp4_moe_mma import mxfp4_grouped_matmul_mma

        return mxfp4_grouped_matmul_mma


@dataclasses.dataclass(frozen=True)
class AbstractGpu:
    """What Mosaic GPU asks of the device it lowers for (``mosaic.gpu.utils._infer_arch``): an
    abstract mesh's device with a ``compute_capability``."""

    compute_capability: str
    platform: str = "gpu"
    num_cores: int | None = None

    @property
    def device_kind(self) -> str:
        return f"abstract {sm_name(self.compute_capability)}"


def lowering_for(compute_capability: str) -> contextlib.AbstractContextManager:
    """Lower Mosaic GPU kernels inside for a GPU of ``compute_capability`` (``"8.0"``, ``"12.0"``):
    pre-Hopper copies (``cp.async``) below 9.0. Without a GPU Mosaic GPU lowers for 9.0; this
    names another through an abstract mesh (``jax.sharding.use_abstract_mesh``)."""
    import jax

    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=AbstractGpu(compute_capability))
    return jax.sharding.use_abstract_mesh(mesh)


def sm_name(compute_capability: str) -> str:
    """``sm_89`` for ``"8.9"``."""
    return "sm_" + compute_capability.replace(".", "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionHeads:
    """gpt-oss's attention geometry (both models): 64 query heads sharing 8 KV heads of 64."""

    q_heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64

    @property
    def heads_suffix(self) -> str:
        """`` heads=8/1`` for one device's query / KV heads under ``tensor`` ('' for all 64 / 8)."""
        whole = AttentionHeads()
        if (self.q_heads, self.kv_heads) == (whole.q_heads, whole.kv_heads):
            return ""
        return f" heads={self.q_heads}/{self.kv_heads}"


@dataclasses.dataclass(frozen=True)
class PrefillCase(AttentionHeads):
    """Flash attention over a prompt of ``seq_len`` tokens, full or with a sliding window."""

    seq_len: int
    window: int | None
    batch: int = 1
    config: Any = None  # pallas_kernels.flash_attention.FlashAttentionConfig

    kernel = "flash"
    arch = "9.0"

    @property
    def name(self) -> str:
        return (f"flash T={self.seq_len} {'window' if self.window else 'full'}" + self.heads_suffix
                + config_suffix(self.config))

    def export(self) -> None:
        import jax
        import jax.numpy as jnp

        from pallas_kernels.flash_attention import flash_attention

        def attention(q, k, v, sinks):
            return flash_attention(q, k, v, sinks, sliding_window=self.window,
                                   softmax_scale=self.head_dim**-0.5, config=self.config)

        kv = jax.ShapeDtypeStruct((self.batch, self.seq_len, self.kv_heads, self.head_dim), jnp.bfloat16)
        jax.export.export(jax.jit(attention), platforms=["cuda"])(
            jax.ShapeDtypeStruct((self.batch, self.seq_len, self.q_heads, self.head_dim), jnp.bfloat16),
            kv, kv, jax.ShapeDtypeStruct((self.q_heads,), jnp.bfloat16),
        )


@dataclasses.dataclass(frozen=True)
class DecodeCase(AttentionHeads):
    """Decode attention of ``q_len`` new tokens per sequence against a cache of ``context`` tokens.

    A sliding layer's cache is its ring of ``window`` slots, whatever the context.
    """

    batch: int
    context: int
    window: int | None
    q_len: int = 1
    config: Any = None  # pallas_kernels.decode_attention.DecodeAttentionConfig

    kernel = "decode"
    arch = "9.0"

    @property
    def cache_len(self) -> int:
        return min(self.window, self.context) if self.window else self.context

    @property
    def name(self) -> str:
        layer = "sliding" if self.window else "full"
        return (f"decode {layer} ctx={self.context // 1024}K batch={self.batch}" + self.heads_suffix
                + config_suffix(self.config))

    def export(self) -> None:
        import jax
        import jax.numpy as jnp

        from pallas_kernels.decode_attention import decode_attention

        def attention(q, k, v, sinks, q_positions, kv_positions):
            return decode_attention(q, k, v, sinks, q_positions, kv_positions, sliding_window=self.window,
                                    softmax_scale=self.head_dim**-0.5, config=self.config)

        cache = jax.ShapeDtypeStruct((self.batch, self.cache_len, self.kv_heads, self.head_dim), jnp.bfloat16)
        jax.export.export(jax.jit(attention), platforms=["cuda"])(
            jax.ShapeDtypeStruct((self.batch, self.q_len, self.q_heads, self.head_dim), jnp.bfloat16),
            cache, cache, jax.ShapeDtypeStruct((self.q_heads,), jnp.bfloat16),
            jax.ShapeDtypeStruct((self.batch, self.q_len), jnp.int32),
            jax.ShapeDtypeStruct((self.batch, self.cache_len), jnp.int32),
        )


Case = MoeCase | MmaMoeCase | PrefillCase | DecodeCase


def gpt_oss_cases(
    configs: Sequence[Any] | None = None,
    tokens: Sequence[int] = (1, 8, 64, 4096),
    prefill: Sequence[int] = (4096,),
    contexts: Sequence[int] = (4096, 32768),
    batches: Sequence[int] = (1, 64),
    kernels: Sequence[str] = ("moe", "flash", "decode"),
) -> list[Case]:
    """Every kernel at the shapes of each config (default: gpt-oss-20b and -120b, whole).

    A config with one shard's sizes (fewer experts, heads or expert columns) gives that shard's
    kernels. Attention cases that two configs share are listed once.
    """
    from gptoss_jax.config import preset

    configs = configs or (preset("gpt-oss-20b"), preset("gpt-oss-120b"))
    cases: list[Case] = []
    if "moe" in kernels:
        for config in configs:
            for matmul, n, k in (("mlp1", 2 * config.intermediate_size, config.hidden_size),
                                 ("mlp2", config.hidden_size, config.intermediate_size)):
                cases += [MoeCase(config_label(config), matmul, t, config.num_experts, n, k,
                                  config.experts_per_token) for t in tokens]
    for config in configs:
        heads = dict(q_heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                     head_dim=config.head_dim)
        windows = (config.sliding_window, None)
        if "flash" in kernels:
            cases += [PrefillCase(t, window, **heads) for t in prefill for window in windows]
        if "decode" in kernels:
            cases += [DecodeCase(b, c, window, **heads) for window in windows for c in contexts for b in batches]
    return list(dict.fromkeys(cases))


def shard_cases(kernels: Sequence[str] = ("moe", "flash", "decode")) -> list[Case]:
    """Every kernel at one device's shapes on each mesh of :mod:`benchmarks.kernels.sharded_kernels`,
    less those :func:`gpt_oss_cases` lists: fewer experts (``E<n>``), fewer query and KV heads
    (``heads=q/kv``), and under ``data`` fewer decode rows (its 64 rows split).
    """
    from benchmarks.kernels.sharded_kernels import DECODE_BATCH, MODELS, PREFILL_TOKENS, meshes, shard_config
    from gptoss_jax.config import preset

    whole = set(gpt_oss_cases(kernels=kernels))
    cases = []
    for sizes in meshes():
        rows = DECODE_BATCH // sizes["data"]
        configs = [shard_config(preset(model), sizes) for model in MODELS]
        cases += gpt_oss_cases(configs, tokens=(1, rows, PREFILL_TOKENS), prefill=(PREFILL_TOKENS,),
                               contexts=(4096,), batches=(1, rows), kernels=kernels)
    return sorted((case for case in dict.fromkeys(cases) if case not in whole), key=_shard_order)


def variant_configs() -> dict[str, list[Any]]:
    """Each kernel's configs beside its defaults that a GPU sweep is to decide between: the MoE
    kernel without folded scales, with its earlier nibble decoding, its earlier scale loads, and
    both (the kernel before issue #18; neither folds); decode attention's other residency, its
    XLA merge of a single split, and ASSUMED with its other changes off (the kernel before #18)."""
    from pallas_kernels.decode_attention import DecodeAttentionConfig, Residency
    from pallas_kernels.mxfp4_moe import Config

    return {
        "moe": [Config(fold_scales=False), Config(e2m1_decode="multiply"), Config(scale_source="global"),
                Config(e2m1_decode="multiply", scale_source="global")],
        "decode": [DecodeAttentionConfig(residency=Residency.FITTED),
                   DecodeAttentionConfig(merge_single_split=False),
                   DecodeAttentionConfig(residency=Residency.ASSUMED, split_short_caches=False,
                                         real_partial_rows=False, merge_single_split=False)],
    }


def variant_cases(kernels: Sequence[str] = ("moe", "decode")) -> list[Case]:
    """:func:`variant_configs` at gpt-oss's decode shapes: the MoE at 1 and 8 tokens, decode
    attention at batch 1 and 64 with a 32K context."""
    cases: list[Case] = []
    for kernel, configs in variant_configs().items():
        if kernel not in kernels:
            continue
        shapes = gpt_oss_cases(tokens=(1, 8), contexts=(32768,), batches=(1, 64), kernels=(kernel,))
        cases += [dataclasses.replace(case, config=config) for config in configs for case in shapes]
    return list(dict.fromkeys(cases))


def _shard_order(case: Case) -> tuple:
    """Kernel by kernel, as :func:`gpt_oss_cases` lists them; the largest shard first."""
    share = (-case.experts, case.matmul, case.tokens) if case.kernel == "moe" else (-case.kv_heads, case.name)
    return (("moe", "flash", "decode").index(case.kernel), *share)


def config_suffix(config: Any) -> str:
    """`` block_q=8`` for the fields of a kernel config that differ from its defaults ('' for None)."""
    if config is None:
        return ""
    default = type(config)()
    changed = [f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(default, f.name)]
    return "".join(f" {c}" for c in changed)


def config_label(config: Any) -> str:
    """'20b' / '120b' for the presets' expert counts, else 'E<experts>'."""
    return {32: "20b", 128: "120b"}.get(config.num_experts, f"E{config.num_experts}")


# The mma.sync expert kernel's targets and the GPUs of benchmarks.kernels.kernel_cost that stand for them.
MMA_TARGETS = {"8.0": "A100", "8.9": "RTX 4090, L4", "12.0": "RTX 5090"}


def mma_cases(archs: Sequence[str] = tuple(MMA_TARGETS), tokens: Sequence[int] = (1, 8)) -> list[Case]:
    """The ``mma.sync`` expert kernel at gpt-oss-20b's shapes (the model the GPUs it serves hold),
    both matmuls, ``tokens`` tokens, compiled for each compute capability of ``archs``."""
    from gptoss_jax.config import preset

    moe = gpt_oss_cases((preset("gpt-oss-20b"),), tokens=tokens, kernels=("moe",))
    return [MmaMoeCase(**{f.name: getattr(case, f.name) for f in dataclasses.fields(case)}, arch=arch)
            for arch in archs for case in moe]
