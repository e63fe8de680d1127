"""The command line: demo, generate and chat on the embedded demo checkpoint, bad input, help."""

import io
import re

import pytest

from gptoss_jax import cli
from gptoss_jax.demo import CACHE_ENV_VAR, demo_checkpoint_dir, ensure_demo_checkpoint
from gptoss_jax.tokenizer import build_demo_tokenizer

# The demo's own token count, so that every run below shares its compiled decode loop.
NEW_TOKENS = ["--max-new-tokens", str(cli.DEMO_MAX_NEW_TOKENS)]
THROUGHPUT = re.compile(r"prefill: \d+ tokens, [\d.]+ tokens/s \| decode: \d+ tokens, [\d.]+ tokens/s")


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """The embedded demo checkpoint, written once into a cache folder of this module's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV_VAR, str(tmp_path_factory.mktemp("cache")))
        yield ensure_demo_checkpoint()


def test_demo_checkpoint_is_a_loadable_hf_folder_reused_once_written(demo_checkpoint):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in demo_checkpoint.iterdir()}
    written = (demo_checkpoint / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_checkpoint() == demo_checkpoint == demo_checkpoint_dir()
    assert (demo_checkpoint / "model.safetensors").stat().st_mtime_ns == written
    assert [p.name for p in demo_checkpoint.parent.iterdir()] == [demo_checkpoint.name]  # no staging left


def test_demo_streams_a_final_answer_and_reports_throughput(demo_checkpoint, capsys):
    assert cli.main(["demo"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"^final: \S", out, re.MULTILINE)
    assert err.count(cli.RANDOM_WEIGHTS_NOTE) == 1
    assert f"user: {cli.DEMO_MESSAGE}" in err
    assert THROUGHPUT.search(err)


def test_generate_continues_a_prompt_on_the_embedded_default(demo_checkpoint, capsys):
    assert cli.main(["generate", "The capital of France is", *NEW_TOKENS, "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert cli.RANDOM_WEIGHTS_NOTE in err
    assert THROUGHPUT.search(err)


def test_chat_reads_the_message_from_stdin(demo_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Name three colours.\n"))
    assert cli.main(["chat", "--checkpoint", str(demo_checkpoint), "--reasoning-effort", "low", *NEW_TOKENS]) == 0
    out, err = capsys.readouterr()
    assert re.match(r"(analysis|commentary|final): ", out)
    assert cli.RANDOM_WEIGHTS_NOTE not in err  # a checkpoint was named
    assert THROUGHPUT.search(err)


def test_reply_printer_shows_analysis_apart_from_the_final_answer():
    tokenizer = build_demo_tokenizer(2048)
    reply = tokenizer.encode(
        "<|channel|>analysis<|message|>Paris, surely.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>",
        allowed_special="all",
    )
    stream = io.StringIO()
    printer = cli._ReplyPrinter(tokenizer, stream)
    for token in reply:
        printer.process(token)
    messages = printer.finish()
    assert stream.getvalue() == "analysis: Paris, surely.\nfinal: Paris.\n"
    assert [(m.channel, m.content) for m in messages] == [("analysis", "Paris, surely."), ("final", "Paris.")]


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["generate", ""], "prompt is empty"),
        (["chat", "  "], "message is empty"),
        (["generate", "hello", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["generate", "hello", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["chat", "hello", "--date", "yesterday"], "--date must be YYYY-MM-DD"),
        (["chat", "hello", "--checkpoint", "{missing}"], "checkpoint folder not found"),
        (["generate", "hello", "--mesh", "expert=3"], "needs 3 devices, but there are 1"),
        (["generate", "hello", "--mesh", "pipeline=2"], "pipeline"),
    ],
)
def test_bad_input_gives_one_error_line(argv, complaint, tmp_path, capsys):
    argv = [arg.format(missing=tmp_path / "missing") for arg in argv]
    assert cli.main(argv) == cli.EXIT_FAILURE
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("gptoss-jax: error: ") and complaint in err


def test_a_folder_that_is_no_checkpoint_gives_one_error_line(tmp_path, capsys):
    assert cli.main(["generate", "hello", "--checkpoint", str(tmp_path)]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("gptoss-jax: error: ")


@pytest.mark.parametrize("command", ["convert", "generate", "chat", "demo"])
def test_help_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: gptoss-jax {command}")
