"""open_model: the model-opening policy that the CLI follows, called with plain arguments."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import pytest

import gptoss_jax
from checkpoint_cases import assert_same_parameters, tiny_model
from gptoss_jax.checkpoints.layouts import Layout
from gptoss_jax.checkpoints.safetensors_writer import write_checkpoint
from gptoss_jax.kernel_dispatch import KernelPlan, kernel_gpu_missing
from gptoss_jax.opening import ModelOptionError, open_model
from gptoss_jax.sharding import MeshError
from gptoss_jax.tokenizer import build_demo_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_checkpoint(tiny_model(), tmp_path_factory.mktemp("checkpoint") / "tiny", Layout.HF)
    build_demo_tokenizer(tiny_model().config.vocab_size).save(folder)
    return folder


def test_opens_a_checkpoint_and_says_what_runs_where(checkpoint: Path):
    lines: list[str] = []
    opened = open_model(checkpoint, dtype="float32", kernels="xla", on_status=lines.append)

    assert_same_parameters(opened.model, tiny_model())
    assert opened.model.dtype == jnp.float32
    assert opened.tokenizer.decode(opened.tokenizer.encode("hello")) == "hello"
    assert (opened.folder, opened.kernels, opened.mesh, opened.is_demo) == (checkpoint, KernelPlan("xla", "xla", "xla"), None,
                                                                            False)
    assert opened.describe() == "float32; kernels xla"
    assert lines[0] == f"loading {checkpoint} (float32; kernels xla) ..."
    assert re.fullmatch(r"loaded in [\d.]+ s", lines[1]) and len(lines) == 2


def test_a_checkpoint_with_dense_experts_says_they_are_quantized(tmp_path: Path):
    folder = write_checkpoint(tiny_model(), tmp_path / "fine-tuned", Layout.HF, dense_experts=jnp.bfloat16)
    build_demo_tokenizer(tiny_model().config.vocab_size).save(folder)
    lines: list[str] = []
    opened = open_model(folder, kernels="xla", on_status=lines.append)

    assert_same_parameters(opened.model, tiny_model())
    assert lines[1] == (f"{folder}: quantizing its bfloat16 expert weights (4 tensors) to MXFP4 by the OCP MX rule "
                        "as they load") and len(lines) == 3


def has_kernel_gpu() -> bool:
    return kernel_gpu_missing() is None


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        pytest.param({"kernels": "pallas"}, ModelOptionError,
                     "kernels='pallas' needs an NVIDIA GPU of sm_80, sm_86, sm_89, sm_90, sm_100 or sm_120, but the device is cpu; use "
                     "kernels='xla'", marks=pytest.mark.skipif(has_kernel_gpu(), reason="this GPU runs them")),
        ({"dtype": "float16"}, ModelOptionError, "dtype must be one of ('bfloat16', 'float32'), got 'float16'"),
        ({"mesh": "expert=3"}, MeshError, "needs 3 devices, but there are 1"),
        ({"decode_experts": True, "kernels": "interpret"}, ModelOptionError,
         "decode_experts is for the XLA path, but the interpret expert kernel runs here and reads the packed "
         "weights; add kernels='xla'"),
    ],
)
def test_options_that_cannot_work_are_refused_before_any_weight_is_read(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, options: dict, error: type, message: str
):
    monkeypatch.setattr(gptoss_jax, "load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    # The tiny model's experts fit no kernel; these sizes would.
    monkeypatch.setattr("gptoss_jax.kernel_dispatch.moe_kernel_misfit", lambda config, dtype: None)
    with pytest.raises(error) as raised:
        open_model(checkpoint, **options)
    assert message in str(raised.value)


def test_the_environment_can_ask_for_the_kernels_too(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    if has_kernel_gpu():
        pytest.skip("this GPU runs the kernels")
    monkeypatch.setenv("GPTOSS_JAX_KERNELS", "pallas")
    with pytest.raises(ModelOptionError, match=r"^GPTOSS_JAX_KERNELS=pallas needs an NVIDIA GPU of sm_80"):
        open_model(checkpoint)
