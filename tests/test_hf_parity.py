"""Logit parity with Hugging Face ``GptOssForCausalLM`` (CPU), the oracle nobody here wrote.

A tiny random model is written in BOTH public layouts (MXFP4 experts, hidden size 64 != expert
size 96, large sinks, prompts longer than the 8-token sliding window). transformers loads the
HF folder (dequantizing MXFP4 itself); this project loads each folder with ``gptoss_jax.load``.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gptoss_jax
from checkpoint_cases import parity_model
from gptoss_jax.checkpoints.layouts import Layout
from gptoss_jax.checkpoints.safetensors_writer import write_checkpoint

SEQUENCE_LENGTH = 40


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    model = parity_model()
    config = model.config
    assert config.hidden_size != config.intermediate_size and SEQUENCE_LENGTH > config.sliding_window
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("parity")
    folders = {
        Layout.HF: write_checkpoint(model, root / "hf", Layout.HF, max_shard_bytes=200_000),
        Layout.ORIGINAL: write_checkpoint(model, root / "original", Layout.ORIGINAL),
    }
    tokens = rng.integers(0, config.vocab_size, (2, SEQUENCE_LENGTH))
    return folders, tokens


@pytest.fixture(scope="module")
def hf_logits(checkpoints):
    from transformers import GptOssForCausalLM, Mxfp4Config

    folders, tokens = checkpoints
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = GptOssForCausalLM.from_pretrained(
            folders[Layout.HF], torch_dtype=dtype, quantization_config=Mxfp4Config(dequantize=True)
        )
        with torch.no_grad():
            logits[dtype] = model(torch.tensor(tokens)).logits.float().numpy()
    return logits


def our_logits(folder, tokens, dtype):
    model = gptoss_jax.load(folder, dtype=dtype, kernels="xla")
    return np.asarray(model(jnp.asarray(tokens, jnp.int32)))


@pytest.mark.parametrize("layout", [Layout.HF, Layout.ORIGINAL])
def test_float32_logits_match_transformers(checkpoints, hf_logits, layout):
    folders, tokens = checkpoints
    ours = our_logits(folders[layout], tokens, jnp.float32)
    expected = hf_logits[torch.float32]
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero logits
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("layout", [Layout.HF, Layout.ORIGINAL])
def test_bfloat16_error_is_within_transformers_own(checkpoints, hf_logits, layout):
    folders, tokens = checkpoints
    reference = hf_logits[torch.float32]
    transformers_error = np.abs(hf_logits[torch.bfloat16] - reference)
    our_error = np.abs(our_logits(folders[layout], tokens, jnp.bfloat16) - reference)
    assert transformers_error.max() > 0  # bfloat16 really rounds
    assert our_error.max() <= transformers_error.max()
    assert our_error.mean() <= 1.5 * transformers_error.mean()
