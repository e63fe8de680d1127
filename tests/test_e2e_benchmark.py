"""benchmarks/gpu/e2e.py: its CPU mode writes every figure, and its roofline arithmetic matches published figures.

These check that the script works, not how fast anything is.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.gpu import e2e
from benchmarks.memory.budget import parameter_bytes
from gptoss_jax.config import preset

PROMPT_LEN, NEW_TOKENS = 12, 6
REPORT_FIELDS = {
    "date", "commit", "device_kind", "platform", "jax_version", "model", "config", "kernels", "parameter_bytes",
    "parameter_parts", "build_seconds", "bytes_in_use_after_build", "peak_hbm_bytes_per_second", "runs",
}
RUN_FIELDS = {
    "batch", "prompt_len", "new_tokens", "prefill_chunk_size", "prefill_tokens", "prefill_seconds", "prefill_tokens_per_second",
    "time_to_first_token_seconds", "decode_tokens", "decode_seconds", "decode_tokens_per_second",
    "compile_seconds", "timed_run_compile_seconds", "peak_bytes_in_use", "expected_distinct_experts",
    "first_decode_step_bytes", "decode_roofline_seconds", "decode_roofline_fraction",
}
TABLE_COLUMNS = 15


def table_rows(markdown: str) -> list[list[str]]:
    """The data rows of RESULTS.md's table, as cells."""
    rows = [line for line in markdown.splitlines() if line.startswith("| 20")]  # rows start with the date
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_cpu_mode_writes_the_json_and_appends_a_row_per_run(tmp_path, monkeypatch):
    results_md, json_path = tmp_path / "RESULTS.md", tmp_path / "e2e.json"
    # The CPU has no roofline; a made-up bandwidth makes the script compute and write it anyway.
    bandwidth = 1e11
    monkeypatch.setattr(e2e, "peak_bandwidth", lambda device: bandwidth)
    arguments = ["--model", "tiny", "--prompt-len", str(PROMPT_LEN), "--new-tokens", str(NEW_TOKENS),
                 "--results-md", str(results_md), "--json", str(json_path)]
    report = e2e.main([*arguments, "--batch", "1", "2", "--profile", str(tmp_path / "trace")])

    written = json.loads(json_path.read_text())
    assert written == json.loads(json.dumps(report))
    assert REPORT_FIELDS <= written.keys()
    assert written["model"] == "tiny" and written["kernels"] == "xla"
    assert written["parameter_bytes"] == sum(parameter_bytes("tiny").values())
    assert [run["batch"] for run in written["runs"]] == [1, 2]
    for run in written["runs"]:
        assert RUN_FIELDS <= run.keys()
        assert run["prefill_tokens"] == run["batch"] * PROMPT_LEN
        assert run["decode_tokens"] == run["batch"] * NEW_TOKENS  # no row stopped early
        assert run["prefill_tokens_per_second"] > 0 and run["decode_tokens_per_second"] > 0
        assert run["compile_seconds"] > 0 and run["timed_run_compile_seconds"] == 0  # the warm-up compiled
        assert run["decode_roofline_fraction"] == pytest.approx(run["decode_roofline_seconds"] / run["decode_seconds"])
        # NEW_TOKENS - 1 steps (the first token is the prefill's); later ones read a longer cache.
        assert run["decode_roofline_seconds"] > (NEW_TOKENS - 1) * sum(run["first_decode_step_bytes"].values()) / bandwidth
        # --profile: a trace per batch size, and the decode loop's operations in it.
        trace = run["decode_trace"]
        assert trace["trace_dir"] == str(tmp_path / "trace" / f"batch-{run['batch']}")
        assert trace["operations_per_step"] > 10 and 0 < trace["busy_fraction"] <= 1 and trace["top_ops"]
        assert trace["summary"].startswith("jit__decode:")

    markdown = results_md.read_text()
    assert markdown.startswith(e2e.RESULTS_HEADER)
    rows = table_rows(markdown)
    assert [len(row) for row in rows] == [TABLE_COLUMNS] * 2
    assert [(row[3], row[5], row[6], row[7]) for row in rows] == [
        ("tiny", "1", str(PROMPT_LEN), str(NEW_TOKENS)), ("tiny", "2", str(PROMPT_LEN), str(NEW_TOKENS))
    ]
    assert rows[0][11] != "n/a"  # the roofline column

    # A second invocation appends below the earlier rows; the header is written once.
    e2e.main([*arguments, "--batch", "1", "--commit", "abc1234"])
    markdown = results_md.read_text()
    assert markdown.count("# End-to-end benchmark results") == 1
    assert table_rows(markdown)[:2] == rows
    assert table_rows(markdown)[2][1] == "abc1234"


@pytest.mark.parametrize("model, batch, distinct", [
    ("gpt-oss-20b", 1, 4), ("gpt-oss-20b", 8, 21), ("gpt-oss-20b", 64, 32),
    ("gpt-oss-120b", 8, 29), ("gpt-oss-120b", 32, 82),
])
def test_distinct_experts_match_prior_art(model, batch, distinct):
    config = preset(model)
    assert round(e2e.expected_distinct_experts(config.num_experts, config.experts_per_token, batch)) == distinct


@pytest.mark.parametrize("model, gigabytes", [("gpt-oss-20b", 3.70), ("gpt-oss-120b", 4.97)])
def test_batch_one_step_bytes_match_the_published_estimate(model, gigabytes):
    """Bytes read per decode step at batch 1, short context: the 3.7 GB (20b) and 4.97 GB (120b) of
    the usual bandwidth-bound estimate (the active experts' MXFP4 bytes, the dense weights and the
    unembedding)."""
    step = e2e.decode_step_bytes(preset(model), parameter_bytes(model), batch=1, context=1, cache_itemsize=2)
    assert sum(step.values()) / 1e9 == pytest.approx(gigabytes, rel=0.01)


def test_kv_cache_bytes_grow_on_full_layers_only_past_the_window():
    config = preset("gpt-oss-20b")
    parts = parameter_bytes("gpt-oss-20b")

    def kv(context: int) -> float:
        return e2e.decode_step_bytes(config, parts, 1, context, 2)["kv_cache"]

    slot_bytes = 2 * config.num_key_value_heads * config.head_dim * 2 + 4
    full_layers = config.num_hidden_layers // 2
    assert kv(1) == config.num_hidden_layers * slot_bytes
    assert kv(2000) - kv(1000) == 1000 * full_layers * slot_bytes
