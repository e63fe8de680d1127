"""Where the Pallas kernel tests run: Mosaic GPU interpret mode always, the GPU when there is one.

Tests that take the ``kernel_mode`` fixture run twice: ``interpret`` executes the kernels on the
CPU in the variants interpret mode can run (the decoded MXFP4 tile and the softmax
probabilities staged through shared memory); ``gpu`` compiles them for the GPU in their
production variants (register-LHS WGMMA), and is skipped without a Hopper GPU. On a GPU
machine, ``pytest -k gpu`` runs only the compiled ones.
"""

from __future__ import annotations

import pytest

from gptoss_jax.kernel_dispatch import has_hopper_gpu

_NO_GPU = pytest.mark.skipif(not has_hopper_gpu(), reason="needs a Hopper (sm_90) GPU")


@pytest.fixture(params=["interpret", pytest.param("gpu", marks=_NO_GPU)])
def kernel_mode(request: pytest.FixtureRequest) -> str:
    """``"interpret"`` or ``"gpu"``."""
    return request.param


@pytest.fixture
def gpu() -> None:
    """Skips a test (one at real gpt-oss sizes, too slow for interpret mode) without a GPU."""
    if not has_hopper_gpu():
        pytest.skip("needs a Hopper (sm_90) GPU")
