"""What the first-use kernel check runs (:mod:`gptoss_jax.kernel_check`): each Pallas kernel at
shapes the model really runs, against its XLA reference, with the tolerance its tests use.

A check runs in a child process of its own, ``python -m gptoss_jax.kernel_check_cases REQUEST
RESULT``: REQUEST is a JSON file naming the case function (``module:function``), the model's
config, the sizes and whether to interpret; the child writes the cases' results to RESULT as
JSON. A kernel that crashes or never returns takes only that process with it.

A case function takes ``(config, sizes, interpret)`` and returns a :class:`CaseResult` per
case; it raises if the kernel does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

from gptoss_jax.config import GptOssConfig
from pallas_kernels.attention_reference import EMPTY_SLOT, KERNEL_ATOL, attention_reference
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.mxfp4_moe import mxfp4_grouped_matmul
from pallas_kernels.mxfp4_moe_mma import mxfp4_grouped_matmul_mma
from pallas_kernels.mxfp4_moe_reference import KERNEL_EXACT_FRACTION, KERNEL_RTOL, mxfp4_grouped_matmul_reference


@dataclasses.dataclass(frozen=True)
class CheckSizes:
    """The sizes a check runs at, beside the model's own (hidden, expert and head sizes).

    Attributes:
      moe_tokens: tokens routed through both expert matmuls, each count a case (8: a decode
        batch, 64: a prefill chunk's worth of rows per expert group).
      decode_batch: sequences in the decode step.
      decode_positions: cache slots each sequence's new token attends over (a few thousand).
      prefill_tokens: tokens of the prompt chunk the prefill kernel runs (the engine's 512).
    """

    moe_tokens: tuple[int, ...] = (8, 64)
    decode_batch: int = 4
    decode_positions: int = 4096
    prefill_tokens: int = 512

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CheckSizes:
        return cls(**{**raw, "moe_tokens": tuple(raw["moe_tokens"])})


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """One kernel run against its reference: ``values`` compared, ``mismatched`` beyond the tolerance."""

    case: str
    values: int
    mismatched: int
    max_error: float

    @property
    def passed(self) -> bool:
        return self.mismatched == 0

    def describe(self) -> str:
        """``mlp2, 64 tokens: 37 of 737280 values beyond the tolerance (largest error 0.5)``."""
        if self.passed:
            return f"{self.case}: within the tolerance (largest error {self.max_error:.3g})"
        return (f"{self.case}: {self.mismatched} of {self.values} values beyond the tolerance "
                f"(largest error {self.max_error:.3g})")


_PR_SET_PDEATHSIG = 1  # prctl's option, from <linux/prctl.h>
CaseFunction = Callable[[GptOssConfig, CheckSizes, bool], list[CaseResult]]


def compare(case: str, got: jax.Array, want: jax.Array, *, rtol: float, atol: float,
            exact_fraction: float = 0.0) -> CaseResult:
    """``got`` against ``want`` as ``np.testing.assert_allclose`` does (NaN is a mismatch).

    ``exact_fraction``: the share of values that must be bit-equal, else every unequal value
    counts as mismatched (the expert kernel's tests ask 99%: same rounding points as the reference).
    """
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if got.shape != want.shape:
        raise ValueError(f"{case}: the kernel gave shape {got.shape}, the reference {want.shape}")
    error = np.abs(got - want)
    mismatched = int(np.sum(~np.isclose(got, want, rtol=rtol, atol=atol)))
    if np.mean(got == want) < exact_fraction:
        mismatched = max(mismatched, int(np.sum(got != want)))
    return CaseResult(case, got.size, mismatched, float(error.max()))  # NaN if any value is


def check_experts(config: GptOssConfig, sizes: CheckSizes, interpret: bool) -> list[CaseResult]:
    """The MXFP4 expert kernel on WGMMA (Hopper's): :func:`_expert_cases`."""
    return _expert_cases(mxfp4_grouped_matmul, config, sizes, interpret)


def check_experts_mma(config: GptOssConfig, sizes: CheckSizes, interpret: bool) -> list[CaseResult]:
    """The MXFP4 expert kernel on ``mma.sync`` (Ampere's, Ada's and Blackwell's): :func:`_expert_cases`."""
    return _expert_cases(mxfp4_grouped_matmul_mma, config, sizes, interpret)


def _expert_cases(kernel: Callable[..., jax.Array], config: GptOssConfig, sizes: CheckSizes,
                  interpret: bool) -> list[CaseResult]:
    """An MXFP4 expert kernel: the model's mlp1 (SwiGLU) and mlp2 (routing weights) at each token count.

    Tokens are routed top-k over every expert at random, so the groups are ragged and some
    empty, as in a batch; the weights are random bytes with gpt-oss's range of scales.
    """
    rng = np.random.default_rng(0)
    experts = config.num_experts
    matmuls = (("mlp1", config.hidden_size, 2 * config.intermediate_size, "bias_swiglu"),
               ("mlp2", config.intermediate_size, config.hidden_size, "bias"))
    results = []
    for name, k, n, epilogue in matmuls:
        weights = dict(
            blocks=jnp.asarray(rng.integers(0, 256, (experts, n, k // 32, 16), dtype=np.uint8)),
            scales=jnp.asarray(rng.integers(112, 129, (experts, n, k // 32), dtype=np.uint8)),
            bias=jnp.asarray(rng.standard_normal((experts, n)), jnp.bfloat16),
        )
        for tokens in sizes.moe_tokens:
            chosen = rng.permuted(np.tile(np.arange(experts), (tokens, 1)), axis=1)[:, :config.experts_per_token]
            rows = chosen.size
            problem = dict(
                lhs=jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16),
                group_sizes=jnp.asarray(np.bincount(chosen.ravel(), minlength=experts), jnp.int32),
                row_weights=jnp.asarray(rng.random(rows), jnp.float32) if epilogue == "bias" else None,
                epilogue=epilogue, swiglu_limit=config.swiglu_limit, **weights,
            )
            got = kernel(**problem, interpret=plgpu.InterpretGPUParams() if interpret else None)
            want = mxfp4_grouped_matmul_reference(**problem)
            results.append(compare(f"{name}, {tokens} tokens", got, want, rtol=KERNEL_RTOL, atol=1e-30,
                                   exact_fraction=KERNEL_EXACT_FRACTION))
    return results


def _attention_inputs(config: GptOssConfig, batch: int, q_len: int, kv_len: int, seed: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    heads = (config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads)
    q, k, v = (jax.random.normal(key, (batch, length, count, config.head_dim), jnp.bfloat16)
               for key, length, count in zip(keys, (q_len, kv_len, kv_len), heads, strict=True))
    sinks = jnp.linspace(-6.0, 6.0, config.num_attention_heads).astype(jnp.bfloat16)
    return q, k, v, sinks


def _attention_reference(q, k, v, sinks, q_positions, kv_positions, **options) -> jax.Array:
    """The XLA reference in float32 at full matmul precision: the float64 definition the tests use, near enough."""
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        return attention_reference(*as_f32, sinks, q_positions, kv_positions, **options)


def _windows(config: GptOssConfig) -> tuple[tuple[str, int | None], ...]:
    """gpt-oss alternates sliding-window and full layers: one case each (a compile each)."""
    return ((f"window {config.sliding_window}", config.sliding_window), ("full", None))


def check_prefill_attention(config: GptOssConfig, sizes: CheckSizes, interpret: bool) -> list[CaseResult]:
    """The prefill kernel: a prompt's first chunk of ``prefill_tokens``, on a sliding and a full layer."""
    q, k, v, sinks = _attention_inputs(config, 1, sizes.prefill_tokens, sizes.prefill_tokens, seed=1)
    positions = jnp.arange(sizes.prefill_tokens, dtype=jnp.int32)[None]
    results = []
    for name, window in _windows(config):
        options = dict(sliding_window=window, softmax_scale=config.head_dim ** -0.5)
        got = flash_attention(q, k, v, sinks, interpret=interpret, **options)
        want = _attention_reference(q, k, v, sinks, positions, positions, **options)
        results.append(compare(f"{sizes.prefill_tokens}-token chunk, {name}", got, want,
                               rtol=KERNEL_ATOL, atol=KERNEL_ATOL))
    return results


def _cache_positions(lengths: np.ndarray, window: int | None, slots: int) -> np.ndarray:
    """int32 ``[B, slots]``: the position each slot holds after ``lengths`` tokens, as the model's
    caches keep them: in order on a full layer, in a ring of ``window`` slots on a sliding one."""
    slot = np.arange(slots)[None]
    if window is None:
        return np.where(slot < lengths[:, None], slot, EMPTY_SLOT).astype(np.int32)
    last = lengths[:, None] - 1
    position = last - (last - slot) % window  # the latest position that lands on each slot
    return np.where(position >= 0, position, EMPTY_SLOT).astype(np.int32)


def check_decode_attention(config: GptOssConfig, sizes: CheckSizes, interpret: bool) -> list[CaseResult]:
    """The decode kernel: one new token per sequence against caches filled to different lengths,
    up to ``decode_positions``, on a full layer and on a sliding layer's ring."""
    batch = sizes.decode_batch
    lengths = np.linspace(sizes.decode_positions, sizes.decode_positions // 2 + 1, batch).astype(np.int32)
    q_positions = jnp.asarray(lengths[:, None] - 1, jnp.int32)
    results = []
    for name, window in _windows(config):
        slots = window or sizes.decode_positions
        q, k, v, sinks = _attention_inputs(config, batch, 1, slots, seed=2)
        kv_positions = jnp.asarray(_cache_positions(lengths, window, slots))
        options = dict(sliding_window=window, softmax_scale=config.head_dim ** -0.5)
        got = decode_attention(q, k, v, sinks, q_positions, kv_positions, interpret=interpret, **options)
        want = _attention_reference(q, k, v, sinks, q_positions, kv_positions, **options)
        results.append(compare(f"decode step, batch {batch} at {sizes.decode_positions} positions, {name}", got,
                               want, rtol=KERNEL_ATOL, atol=KERNEL_ATOL))
    return results


def case_function(name: str) -> CaseFunction:
    """The function ``module:function`` names."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def _end_with_parent(parent: int) -> None:
    """Have Linux kill this process when its parent dies, so that a program killed during its
    check leaves no kernel running on its GPU (a parent that lives kills the child itself)."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def main(argv: Sequence[str]) -> int:
    """The child's side: run the request's case function, write its results (a crash writes nothing)."""
    request_path, result_path = argv
    request = json.loads(Path(request_path).read_text())
    _end_with_parent(request["parent"])
    run = case_function(request["run"])
    config = GptOssConfig.from_dict(request["config"])
    results = run(config, CheckSizes.from_dict(request["sizes"]), request["interpret"])
    Path(result_path).write_text(json.dumps([dataclasses.asdict(result) for result in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
