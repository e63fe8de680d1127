"""``gptoss-jax env`` and the errors a GPU user meets, on the CPU: where this machine lacks a fact
(a GPU, its memory, a CUDA release), the test fakes it where the library reads it."""

from __future__ import annotations

import functools
import json
import os
import types
from pathlib import Path

import jax
import pytest

import gptoss_jax
from gptoss_jax import cli, footprint
from gptoss_jax.cli.arguments import option_flag
from gptoss_jax.config import preset, to_hf_dict
from gptoss_jax.cache_folder import CACHE_ENV_VAR
from gptoss_jax.environment import describe_environment, gather_environment
from gptoss_jax.kv_cache import cache_bytes
from gptoss_jax.opening import (
    KernelsUnavailableError,
    MiscompilingCudaError,
    ModelTooLargeError,
    check_parameters_fit,
    open_model,
)
from gptoss_jax.sharding import MeshDeviceCountError
from pallas_kernels import cuda_toolchain

H100 = "NVIDIA H100 80GB HBM3"
H100_JAX_SHARE = int(0.75 * 79.6e9)  # what XLA's allocator takes of an H100 by default


def fake_gpu(monkeypatch: pytest.MonkeyPatch, kind: str, capability: str, limit: int = 80_000_000_000) -> None:
    """Make the default device a GPU of ``kind`` with ``limit`` bytes free, for the kernel and memory checks."""
    stats = {"bytes_limit": limit, "bytes_in_use": 0}
    device = types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=capability, id=0,
                                   memory_stats=lambda: stats)
    monkeypatch.setattr(jax, "devices", lambda *backend: [device])


def fake_cuda(monkeypatch: pytest.MonkeyPatch, ptxas: tuple[int, int, int], runtime: int = 12080) -> None:
    monkeypatch.setattr(cuda_toolchain, "ptxas_version", lambda: ptxas)
    versions = types.SimpleNamespace(cuda_runtime_get_version=lambda: runtime, cuda_driver_get_version=lambda: 12090)
    monkeypatch.setattr("jax._src.lib.cuda_versions", versions)


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The cache folder, which must stay empty: a refusal comes before the demo checkpoint is written."""
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(gptoss_jax, "load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    return tmp_path


@pytest.fixture(scope="module")
def gpt_oss_120b_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with gpt-oss-120b's config.json and nothing else: all that env reads."""
    folder = tmp_path_factory.mktemp("gpt-oss-120b")
    (folder / "config.json").write_text(json.dumps(to_hf_dict(preset("gpt-oss-120b"))))
    return folder


def test_env_on_the_cpu_compiles_nothing_and_says_why_the_kernels_do_not_run(capsys, monkeypatch, tmp_path, request):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    # A CLI run earlier in this process set JAX's cache folder (the CLI leaves a set one alone).
    request.addfinalizer(functools.partial(jax.config.update, "jax_compilation_cache_dir",
                                           jax.config.jax_compilation_cache_dir))
    jax.config.update("jax_compilation_cache_dir", None)
    compiled = []
    listener = lambda event, duration, **kwargs: compiled.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        assert cli.main(["env"]) == 0
        assert cli.main(["env", "--json"]) == 0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not [event for event in compiled if "backend_compile" in event]
    text, report = capsys.readouterr().out.split("\n{", 1)
    report = json.loads("{" + report)
    assert report["packages"]["jax"] == jax.__version__ and report["backend"] == "cpu"
    assert report["compilation_cache"] == str(tmp_path / "jax-compilation")
    assert "jax:    " + jax.__version__ in report["jax_environment_info"]
    lines = text.splitlines()
    assert f"compilation cache: {tmp_path / 'jax-compilation'}" in lines
    experts = "auto: the expert kernels need an NVIDIA GPU of sm_80, sm_86, sm_89, sm_90, sm_100 or sm_120; the device is cpu"
    attention = "auto: the attention kernels need an NVIDIA Hopper GPU (sm_90); the device is cpu"
    for kernel, reason in (("MoE experts", experts), ("prefill attention", attention), ("decode attention", attention)):
        assert report["kernels"]["parts"][kernel] == {"runs": "xla", "why": reason, "check": None}
        assert [line for line in lines if line.strip().startswith(kernel)] == [f"  {kernel:17}  xla     {reason}"]


def test_env_points_to_pips_ptxas_when_mosaic_gpu_would_find_none(monkeypatch, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ptxas").touch()
    monkeypatch.setattr("gptoss_jax.environment.mosaic_ptxas", lambda: None)
    monkeypatch.setattr("jax._src.lib.cuda_path", str(tmp_path))
    text = describe_environment(gather_environment())
    assert f"ptxas: none on PATH or in /usr/local/cuda/bin; pip's is in {tmp_path / 'bin'}: put that first on PATH" in (
        text.splitlines())


def test_env_sizes_a_checkpoint_from_its_config_against_the_device(gpt_oss_120b_config, monkeypatch):
    fake_gpu(monkeypatch, H100, "9.0", limit=int(0.95 * 79.6e9))  # XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
    report = gather_environment(gpt_oss_120b_config, option_name=option_flag)
    model = report["checkpoint"]
    assert (model["model"], model["parameter_bytes_per_device"], model["refused"]) == ("gpt-oss-120b", 65249236224,
                                                                                      None)
    room = footprint.MEMORY_FRACTION * int(0.95 * 79.6e9) - 65249236224
    context = model["largest_context_at_batch_1"]
    assert cache_bytes(preset("gpt-oss-120b"), 1, context) <= room < cache_bytes(preset("gpt-oss-120b"), 1, context + 1)
    assert f"  largest context at batch 1: {context} positions (a bfloat16" in describe_environment(report)

    fake_gpu(monkeypatch, H100, "9.0", limit=H100_JAX_SHARE)
    model = gather_environment(gpt_oss_120b_config, option_name=option_flag)["checkpoint"]
    assert model["refused"].startswith("the model's parameters take 65.25 GB per device")
    assert model["largest_context_at_batch_1"] == 0


def test_largest_context_is_the_longest_cache_within_the_room():
    config = preset("gpt-oss-20b")
    assert footprint.largest_context(config, cache_bytes(config, 1, 5000)) == 5000
    assert footprint.largest_context(config, cache_bytes(config, 1, 5000) - 1) == 4999
    assert footprint.largest_context(config, 1e12) == config.max_position_embeddings
    assert footprint.largest_context(config, -1.0) == 0


def test_free_memory_is_the_allocators_limit_less_what_is_in_use():
    gpu = types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": 60_000, "bytes_in_use": 15_000})
    assert (footprint.device_memory_bytes(gpu), footprint.device_free_bytes(gpu)) == (60_000, 45_000)
    cpu = jax.devices()[0]  # no allocator figures: the RAM
    assert 0 < footprint.device_free_bytes(cpu) <= footprint.device_memory_bytes(cpu)


def test_pallas_where_no_kernel_runs_is_refused_with_the_fix(no_loading, monkeypatch):
    kind = "Tesla V100-SXM2-16GB"
    fake_gpu(monkeypatch, kind, "7.0")
    with pytest.raises(KernelsUnavailableError) as raised:
        open_model(kernels="pallas", option_name=option_flag)
    assert str(raised.value) == (f"--kernels pallas needs an NVIDIA GPU of sm_80, sm_86, sm_89, sm_90, sm_100 or sm_120, but the device is {kind} "
                                 "(sm_70); use --kernels xla")
    assert not any(no_loading.iterdir())
    parts = gather_environment()["kernels"]["parts"]
    why = f"auto: the expert kernels need an NVIDIA GPU of sm_80, sm_86, sm_89, sm_90, sm_100 or sm_120; the device is {kind} (sm_70)"
    assert parts["MoE experts"] == {"runs": "xla", "why": why, "check": None}
    assert parts["decode attention"]["why"] == f"auto: the attention kernels need an NVIDIA Hopper GPU (sm_90); the device is {kind} (sm_70)"


@pytest.mark.parametrize(("kind", "capability"), [
    ("NVIDIA A100-SXM4-80GB", "8.0"), ("NVIDIA L4", "8.9"), ("NVIDIA B200", "10.0"), ("NVIDIA GeForce RTX 5090", "12.0"),
])
def test_ampere_ada_and_blackwell_run_the_mma_sync_expert_kernel_and_attention_on_xla(monkeypatch, kind, capability):
    fake_gpu(monkeypatch, kind, capability)
    sm = "sm_" + capability.replace(".", "")
    parts = gather_environment()["kernels"]["parts"]
    assert parts["MoE experts"] == {"runs": "pallas", "check": None, "why": (
        f"auto: the device is {kind} ({sm}); not checked here yet (gptoss-jax env --check-kernels)")}
    for attention in ("prefill attention", "decode attention"):
        assert parts[attention] == {"runs": "xla", "check": None, "why": (
            f"the attention kernels need an NVIDIA Hopper GPU (sm_90); the device is {kind} ({sm}), where "
            "attention stays on XLA (docs/kernels.md)")}
    from gptoss_jax.kernel_dispatch import expert_matmul
    from pallas_kernels.mxfp4_moe_mma import mxfp4_grouped_matmul_mma

    assert expert_matmul("pallas") is mxfp4_grouped_matmul_mma


def test_a_miscompiling_cuda_refuses_pallas_and_keeps_auto_attention_on_xla(no_loading, monkeypatch, capsys):
    fake_gpu(monkeypatch, H100, "9.0")
    fake_cuda(monkeypatch, (12, 8, 61))
    with pytest.raises(MiscompilingCudaError) as raised:
        open_model(kernels="pallas", option_name=option_flag)
    assert str(raised.value) == (
        "--kernels pallas: the ptxas of CUDA 12.8.0 up to 12.9.0 miscompiles masked attention (ptxas 12.8.61); "
        "put CUDA 12.9.1's ptxas (V12.9.86) or newer first on PATH, or --kernels auto to keep attention on XLA there")
    monkeypatch.setenv("GPTOSS_JAX_KERNELS", "pallas")
    with pytest.raises(MiscompilingCudaError, match=r"^GPTOSS_JAX_KERNELS=pallas: .* or unset GPTOSS_JAX_KERNELS to"):
        open_model(option_name=option_flag)
    monkeypatch.delenv("GPTOSS_JAX_KERNELS")

    report = gather_environment()
    assert report["cuda"] == {"runtime": "12.8", "driver": "12.9"}
    parts = report["kernels"]["parts"]
    assert parts["MoE experts"] == {"runs": "pallas", "check": None, "why": (
        f"auto: the device is {H100} (sm_90); not checked here yet (gptoss-jax env --check-kernels)")}
    for attention in ("prefill attention", "decode attention"):
        assert parts[attention]["runs"] == "xla"
        assert parts[attention]["why"].startswith("the ptxas of CUDA 12.8.0 up to 12.9.0 miscompiles masked "
                                                  "attention (ptxas 12.8.61); put CUDA 12.9.1's ptxas")
    assert not any(no_loading.iterdir())


def test_the_cli_gives_xla_most_of_the_gpu_unless_told(monkeypatch, capsys):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert cli.main(["env"]) == 0
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert cli.main(["env"]) == 0
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"


def test_a_model_larger_than_the_free_memory_is_refused_before_loading(no_loading, monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)  # as a Python program starts
    fake_gpu(monkeypatch, H100, "9.0", limit=H100_JAX_SHARE)
    with pytest.raises(ModelTooLargeError) as raised:
        check_parameters_fit(preset("gpt-oss-120b"), None, option_flag)
    assert str(raised.value) == (
        f"the model's parameters take 65.25 GB per device, but {H100} (device 0) has 59.70 GB free; give JAX more "
        "of the GPU than 0.75 by default (XLA_PYTHON_CLIENT_MEM_FRACTION=0.95), use a device with more memory, or "
        "split the model over more devices (--mesh)")
    check_parameters_fit(preset("gpt-oss-20b"), None, option_flag)  # 13.76 GB fit

    fake_gpu(monkeypatch, H100, "9.0", limit=1_000_000)  # the demo model's parameters alone take more
    with pytest.raises(ModelTooLargeError, match="but NVIDIA H100 80GB HBM3 \\(device 0\\) has 0.00 GB free"):
        open_model(kernels="xla")
    assert not any(no_loading.iterdir())


def test_gpt_oss_20b_on_a_16_gb_card_needs_most_of_it_for_xla(tmp_path, monkeypatch):
    # An RTX 4060 Ti 16 GB has 16 GiB. XLA's allocator takes 75% by default: 12.88 GB, under
    # 20b's 13.76 GB of parameters, so 20b is refused with the fix; with the CLI's 95% a batch-1
    # cache of over 32K positions fits beside them (benchmarks/memory/budget.py --fit has the programs).
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)  # as a Python program starts
    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(preset("gpt-oss-20b"))))
    card = "NVIDIA GeForce RTX 4060 Ti"
    fake_gpu(monkeypatch, card, "8.9", limit=int(0.75 * 16 * 2**30))
    model = gather_environment(tmp_path, option_name=option_flag)["checkpoint"]
    assert model["refused"] == (
        f"the model's parameters take 13.76 GB per device, but {card} (device 0) has 12.88 GB free; give JAX "
        "more of the GPU than 0.75 by default (XLA_PYTHON_CLIENT_MEM_FRACTION=0.95), use a device with more memory, "
        "or split the model over more devices (--mesh)")
    fake_gpu(monkeypatch, card, "8.9", limit=int(0.95 * 16 * 2**30))
    model = gather_environment(tmp_path, option_name=option_flag)["checkpoint"]
    assert model["refused"] is None and model["largest_context_at_batch_1"] > 32768


def test_a_mesh_of_more_devices_than_there_are_is_refused_with_the_fix(no_loading, gpt_oss_120b_config, capsys):
    with pytest.raises(MeshDeviceCountError) as raised:
        open_model(mesh="expert=4,tensor=2")
    assert str(raised.value) == ("mesh data=1, expert=4, tensor=2 needs 8 devices, but there are 1; give sizes whose "
                                 "product is 1, or leave the mesh out (the default spans every device)")
    assert cli.main(["env", "--checkpoint", str(gpt_oss_120b_config), "--mesh", "tensor=2"]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == ("gptoss-jax: error: mesh data=1, expert=1, tensor=2 needs 2 devices, but there "
                                       "are 1; give sizes whose product is 1, or leave the mesh out (the default "
                                       "spans every device)\n")
