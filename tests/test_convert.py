"""The converter: round trips in every source layout, bad input, atomicity, streaming, progress."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from checkpoint_cases import (
    BREAKAGES,
    SOURCE_KINDS,
    TOKENIZER_TEXT,
    SourceKind,
    assert_same_parameters,
    copy_folder,
    model_logits,
    recording_safe_open,
    sources,
    tiny_model,
    write_source,
)
from fake_terminal import FakeTerminal
from gptoss_jax.checkpoints import orbax_writer, safetensors_reader
from gptoss_jax.checkpoints.folder import CONFIG_FILENAME, CheckpointError
from gptoss_jax.checkpoints.layouts import parameter_sources
from gptoss_jax.checkpoints.orbax_format import MARKER_FILENAME, restore
from gptoss_jax.checkpoints.orbax_writer import convert_checkpoint
from gptoss_jax.checkpoints.safetensors_reader import SafetensorsCheckpoint
from gptoss_jax.checkpoints.safetensors_writer import model_tensors
from gptoss_jax.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, list[str]]:
    """Exit status, stdout and the stderr lines of ``gptoss-jax ARGV``."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.splitlines()


@pytest.mark.parametrize("kind", SOURCE_KINDS, ids=lambda kind: kind.name)
def test_round_trip_restores_the_exact_model(kind: SourceKind, sources: dict[str, Path], tmp_path: Path):
    destination = convert_checkpoint(sources[kind.name], tmp_path / "converted", progress=False)

    model = restore(destination)
    assert_same_parameters(model, tiny_model())
    np.testing.assert_array_equal(model_logits(model), model_logits(tiny_model()))
    assert json.loads((destination / "config.json").read_text()) == tiny_model().config.to_dict()
    assert json.loads((destination / MARKER_FILENAME).read_text())["source_layout"] == kind.layout.value
    assert (destination / "tokenizer.json").read_text() == TOKENIZER_TEXT


def test_original_folder_takes_the_tokenizer_from_its_parent(sources: dict[str, Path], tmp_path: Path):
    # Hugging Face's gpt-oss repositories: tokenizer.json at the root, none in original/.
    repository = tmp_path / "gpt-oss-tiny"
    source = copy_folder(sources["original"], repository / "original")
    (source / "tokenizer.json").rename(repository / "tokenizer.json")

    destination = convert_checkpoint(source, tmp_path / "converted", progress=False)

    assert (destination / "tokenizer.json").read_text() == TOKENIZER_TEXT


def test_source_without_a_tokenizer_converts_with_a_warning(sources: dict[str, Path], tmp_path: Path):
    source = copy_folder(sources["original"], tmp_path / "original")
    (source / "tokenizer.json").unlink()

    with pytest.warns(UserWarning, match=f"{source} has no tokenizer.json"):
        destination = convert_checkpoint(source, tmp_path / "converted", progress=False)

    assert not (destination / "tokenizer.json").exists()
    assert_same_parameters(restore(destination), tiny_model())


def test_cli_converts(capsys: pytest.CaptureFixture, sources: dict[str, Path], tmp_path: Path):
    status, out, err = run_cli(capsys, "convert", sources["original"], tmp_path / "converted", "--no-progress")

    assert (status, err) == (0, [])
    assert out == f"wrote {tmp_path / 'converted'}\n"
    assert_same_parameters(restore(tmp_path / "converted"), tiny_model())


def test_the_conversion_script_in_the_source_tree_converts(sources: dict[str, Path], tmp_path: Path):
    # `python -m convert` from a checkout, as docs/checkpoints.md says (convert/ is not installed).
    result = subprocess.run(
        [sys.executable, "-m", "convert", sources["hf-sharded"], tmp_path / "converted", "--no-progress"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300,
    )
    assert (result.returncode, result.stdout) == (0, f"wrote {tmp_path / 'converted'}\n"), result.stderr[-4000:]
    assert_same_parameters(restore(tmp_path / "converted"), tiny_model())


def test_cli_prints_the_missing_tokenizer_warning_as_one_line(
    capsys: pytest.CaptureFixture, sources: dict[str, Path], tmp_path: Path
):
    source = copy_folder(sources["original"], tmp_path / "original")
    (source / "tokenizer.json").unlink()

    status, out, err = run_cli(capsys, "convert", source, tmp_path / "converted", "--no-progress")

    assert (status, out) == (0, f"wrote {tmp_path / 'converted'}\n")
    assert len(err) == 1 and err[0].startswith(f"gptoss-jax: warning: {source} has no tokenizer.json"), err


def test_cli_help_explains_the_layouts(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "original/" in help_text and "model.safetensors.index.json" in help_text


@pytest.mark.parametrize("kind", SOURCE_KINDS, ids=lambda kind: kind.name)
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_bad_source_gives_one_error_line_and_leaves_nothing(
    breakage: str, kind: SourceKind, capsys: pytest.CaptureFixture, sources: dict[str, Path], tmp_path: Path
):
    source = copy_folder(sources[kind.name], tmp_path / "source")
    expected_parts = BREAKAGES[breakage](source, kind.layout)

    status, _, err = run_cli(capsys, "convert", source, tmp_path / "converted", "--no-progress")

    assert status == 1
    assert len(err) == 1 and err[0].startswith("gptoss-jax: error: "), err
    for part in expected_parts:
        assert part in err[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_existing_destination_is_left_untouched(
    capsys: pytest.CaptureFixture, sources: dict[str, Path], tmp_path: Path
):
    destination = tmp_path / "converted"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")

    status, _, err = run_cli(capsys, "convert", sources["original"], destination, "--no-progress")

    assert status == 1
    assert err == [f"gptoss-jax: error: {destination} already exists; choose a new destination folder"]
    assert [path.name for path in tmp_path.iterdir()] == ["converted"]
    assert [path.name for path in destination.iterdir()] == ["keep.txt"]


def test_missing_destination_parents_are_made(
    capsys: pytest.CaptureFixture, sources: dict[str, Path], tmp_path: Path
):
    destination = tmp_path / "absent" / "deeper" / "converted"
    status, _, _ = run_cli(capsys, "convert", sources["original"], destination, "--no-progress")

    assert status == 0
    assert [path.name for path in destination.parent.iterdir()] == ["converted"]  # no staging left
    assert (destination / CONFIG_FILENAME).is_file()


@pytest.mark.parametrize(
    "failure, status, message",
    [(KeyboardInterrupt(), 130, "gptoss-jax: interrupted"),
     (CheckpointError("disk went away"), 1, "gptoss-jax: error: disk went away")],
    ids=["interrupt", "error"],
)
def test_failure_while_writing_removes_the_partial_checkpoint(
    failure: BaseException, status: int, message: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, sources: dict[str, Path], tmp_path: Path,
):
    real_nest = orbax_writer.nest

    def nest_then_fail(group, arrays):
        if group == "block.1":  # after four groups are on disk
            raise failure
        return real_nest(group, arrays)

    monkeypatch.setattr(orbax_writer, "nest", nest_then_fail)
    # The folder it had to make for DST goes too.
    assert run_cli(capsys, "convert", sources["hf-sharded"], tmp_path / "new" / "converted", "--no-progress") == (
        status, "", [message],
    )
    assert list(tmp_path.iterdir()) == []


def test_reader_holds_one_parameter_at_a_time(monkeypatch: pytest.MonkeyPatch, sources: dict[str, Path]):
    reads: list[tuple[str, tuple[int, ...]]] = []
    monkeypatch.setattr(safetensors_reader, "safe_open", recording_safe_open(reads))
    source = SafetensorsCheckpoint(sources["hf-sharded"])
    assert reads == []  # validation reads headers only
    tensors_of = parameter_sources(source.config, source.layout)

    yielded: list[weakref.ref] = []
    read_so_far: list[str] = []
    for path, array in source.parameters():
        read_so_far += tensors_of[path]
        assert sorted(set(name for name, _ in reads)) == sorted(read_so_far), f"read ahead of {path}"
        assert all(ref() is None for ref in yielded), f"still holding an earlier parameter at {path}"
        yielded.append(weakref.ref(array))
        del array
    assert len(yielded) == len(source) == len(tensors_of)
    # Every element once: a parameter's reads (for the fused QKV, runs of rows) add up to it.
    parameter_of = {name: path for path, names in tensors_of.items() for name in names}
    elements_read = dict.fromkeys(tensors_of, 0)
    for name, shape in reads:
        elements_read[parameter_of[name]] += int(np.prod(shape))
    assert elements_read == {path: int(np.prod(array.shape)) for path, array in model_tensors(tiny_model()).items()}


@pytest.mark.parametrize(
    "stream, progress, drawn",
    [(FakeTerminal(), True, True), (FakeTerminal(), False, False), (io.StringIO(), True, False)],
    ids=["terminal", "disabled", "not-a-terminal"],
)
def test_progress_bar_only_on_a_terminal(
    stream: io.StringIO, progress: bool, drawn: bool, monkeypatch: pytest.MonkeyPatch,
    sources: dict[str, Path], tmp_path: Path,
):
    monkeypatch.setattr(sys, "stderr", stream)
    convert_checkpoint(sources["original"], tmp_path / "converted", progress=progress)

    output = stream.getvalue()
    if drawn:
        total = len(SafetensorsCheckpoint(sources["original"]))
        assert output.startswith("\rconverting [") and output.endswith("\n")
        assert f"{total}/{total} tensors" in output.splitlines()[-1].split("\r")[-1]
    else:
        assert output == ""
