"""The headline memory goals, from shapes alone (benchmarks/memory.py)."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("memory", Path(__file__).parents[1] / "benchmarks" / "memory.py")
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_parameters_fit_the_goal(name):
    parts = memory.parameter_bytes(name)
    assert sum(parts.values()) / 1e9 < memory.GOALS_GB[name]
    # The experts are what MXFP4 keeps small: 4.25 bits per weight.
    config = memory.preset(name)
    expert_weights = config.num_hidden_layers * config.num_experts * 3 * config.hidden_size * config.intermediate_size
    assert parts["experts (MXFP4 blocks + scales)"] == expert_weights * 17 // 32
