"""The command line: demo, generate and chat on the embedded demo checkpoint, bad input, help."""

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import gptoss_jax
from fake_terminal import FakeTerminal
from gptoss_jax import cli
from gptoss_jax.cli import chat as cli_chat
from gptoss_jax.cli import generation as cli_generation
from gptoss_jax.cli.arguments import SEED_LIMIT, option_flag
from gptoss_jax.cache_folder import CACHE_ENV_VAR
from gptoss_jax.demo import demo_checkpoint_dir, ensure_demo_checkpoint
from gptoss_jax.generate import GenerationOutput, GenerationStats
from gptoss_jax.kernel_dispatch import kernel_gpu_missing
from gptoss_jax.opening import random_weights_note
from gptoss_jax.tokenizer import Tokenizer, build_demo_tokenizer

RANDOM_WEIGHTS_NOTE = random_weights_note(option_flag)  # what the CLI says of the demo model
# The demo's own token count, so that every run below shares its compiled decode loop.
NEW_TOKENS = ["--max-new-tokens", str(cli_chat.DEMO_MAX_NEW_TOKENS)]
THROUGHPUT = re.compile(r"prefill: \d+ tokens, [\d.]+ tokens/s \| decode: (\d+) tokens, [\d.]+ tokens/s")
REPO = Path(__file__).resolve().parents[1]
COMPILING = "compiling and prefilling ..."
QUIET_START = "prefilling ... (a longer conversation compiles once more)"
# Runs cli.main on each argv of a JSON list in one process; prints [[exit status, stderr], ...].
RUN_COMMANDS = """
import contextlib, io, json, sys
from gptoss_jax import cli
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        results.append((cli.main(argv), err.getvalue()))
print(json.dumps(results))
"""
# The CLI with no stop tokens, so that a generation runs until its token limit or Ctrl-C.
RUN_WITHOUT_STOPS = """
import sys
from gptoss_jax import cli
from gptoss_jax.cli import commands
commands.COMPLETION_STOP_TOKENS = ()
sys.exit(cli.main(sys.argv[1:]))
"""


def _python_env(cache: Path, device_count: int = 1) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", GPTOSS_JAX_CACHE=str(cache),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}")


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
    assert err.count(RANDOM_WEIGHTS_NOTE) == 1
    assert f"user: {cli_chat.DEMO_MESSAGE}" in err
    loading = r"^loading \S+demo-\w+ \(bfloat16; kernels xla(; mesh [^)]+)?\) \.\.\.\nloaded in [\d.]+ s$"
    assert re.search(loading, err, re.MULTILINE)
    assert err.count(f"\n{COMPILING}\n") == 1 and err.index(COMPILING) < THROUGHPUT.search(err).start()


def test_generate_continues_a_prompt_on_the_embedded_default(demo_checkpoint, capsys):
    assert cli.main(["generate", "The capital of France is", *NEW_TOKENS, "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert RANDOM_WEIGHTS_NOTE in err
    assert THROUGHPUT.search(err)


def test_decoded_experts_give_the_same_text(demo_checkpoint, capsys):
    argv = ["generate", "The capital of France is", *NEW_TOKENS, "--temperature", "0"]
    assert cli.main(argv) == 0
    packed = capsys.readouterr().out
    assert cli.main([*argv, "--decode-experts"]) == 0
    assert capsys.readouterr().out == packed


def test_zero_new_tokens_reports_no_rate(demo_checkpoint, capsys):
    assert cli.main(["generate", "hello", "--max-new-tokens", "0"]) == 0
    err = capsys.readouterr().err
    assert "prefill: 0 tokens | decode: 0 tokens" in err and "nan" not in err


def test_the_tokenizer_is_checked_before_the_weights_are_read(demo_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text((demo_checkpoint / "config.json").read_text())
    monkeypatch.setattr(gptoss_jax, "load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert cli.main(["generate", "hello", "--checkpoint", str(tmp_path)]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("gptoss-jax: error: ") and "tokenizer.json" in err


def test_a_git_lfs_pointer_for_tokenizer_json_gives_one_error_line(demo_checkpoint, tmp_path, capsys):
    (tmp_path / "config.json").write_text((demo_checkpoint / "config.json").read_text())
    (tmp_path / "tokenizer.json").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 27868174\n")
    assert cli.main(["generate", "hello", "--checkpoint", str(tmp_path)]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == (f"gptoss-jax: error: {tmp_path / 'tokenizer.json'} is a Git LFS pointer, "
                                       "not the file itself: run `git lfs pull` in its repository (or download the file)\n")


def test_only_generates_input_errors_are_one_line(demo_checkpoint, capsys, monkeypatch):
    assert cli.main(["generate", "hello", "--max-new-tokens", "200000"]) == cli.EXIT_FAILURE
    assert "exceeds the model's context" in capsys.readouterr().err

    def broken_generate(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr("gptoss_jax.generate.generate", broken_generate)
    with pytest.raises(ValueError, match="an internal bug"):  # its traceback stays
        cli.main(["generate", "hello"])


def _read_until(stream, enough: Callable[[bytes], bool], timeout: float) -> bytes:
    """What ``stream`` (a pipe) gives until ``enough`` of it came."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not enough(seen):
        assert select.select([stream], [], [], max(deadline - time.monotonic(), 0))[0], f"timed out: {seen!r}"
        chunk = os.read(stream.fileno(), 4096)
        assert chunk, f"the stream ended: {seen!r}"
        seen += chunk
    return seen


@pytest.mark.parametrize("when", ["once while streaming", "twice while compiling"])
def test_ctrl_c_stops_generation_and_exits_130(demo_checkpoint, tmp_path, when):
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_WITHOUT_STOPS, "generate", "hello", "--max-new-tokens", "4000",
         "--checkpoint", str(demo_checkpoint)],
        env=_python_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        if when == "once while streaming":
            # The decode loop streams: the main thread used to be stuck in it, deaf to Ctrl-C.
            _read_until(process.stdout, bool, timeout=240)
            process.send_signal(signal.SIGINT)
        else:
            # The compilation cache (in tmp_path) is empty: compiling takes seconds, and the
            # second Ctrl-C quits without waiting for it.
            err_before = _read_until(process.stderr, lambda seen: b"loaded in" in seen, timeout=240)
            time.sleep(1)
            process.send_signal(signal.SIGINT)
            time.sleep(0.05)
            process.send_signal(signal.SIGINT)
        signalled = time.perf_counter()
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    err = err.decode()
    assert process.returncode == cli.EXIT_INTERRUPTED, err[-4000:]
    assert time.perf_counter() - signalled < 30
    assert err.endswith("gptoss-jax: interrupted\n")
    if when == "once while streaming":
        assert int(THROUGHPUT.search(err).group(1)) < 4000
    else:
        assert "Ctrl-C again quits at once" in err and not THROUGHPUT.search(err_before.decode() + err)


def test_a_closed_stdout_stops_generation_quietly_with_status_141(demo_checkpoint, tmp_path):
    # As `gptoss-jax generate ... | head -c 20`: the reader goes away while tokens still come.
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_WITHOUT_STOPS, "generate", "hello", "--max-new-tokens", "20000",
         "--checkpoint", str(demo_checkpoint)],
        env=_python_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _read_until(process.stdout, bool, timeout=240)
        process.stdout.close()
        closed = time.perf_counter()
        process.wait(timeout=60)
        err = process.stderr.read().decode()
    finally:
        process.kill()
    assert process.returncode == cli.EXIT_BROKEN_PIPE, err[-4000:]
    assert time.perf_counter() - closed < 30  # generation stopped; 20000 tokens take minutes
    assert "Traceback" not in err and "error" not in err and "Exception" not in err
    assert err.splitlines()[-1] == COMPILING


def test_default_mesh_follows_the_model_and_is_checked_before_writing(demo_checkpoint, tmp_path):
    # 4 devices: the demo's 2 KV heads and 8 experts give tensor=2, expert=2.
    generate = ["generate", "hello", "--checkpoint", str(demo_checkpoint), "--max-new-tokens", "4"]
    commands = [["demo", "--mesh", "tensor=4"], [*generate, "--decode-experts"], generate]
    result = subprocess.run([sys.executable, "-c", RUN_COMMANDS, json.dumps(commands)], env=_python_env(tmp_path, 4),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.splitlines()[-1])
    (bad_mesh, bad_mesh_err), (decoded, decoded_err), (default, default_err) = results
    assert bad_mesh == cli.EXIT_FAILURE
    assert bad_mesh_err == ("gptoss-jax: error: the model's 2 KV heads do not divide over the mesh's "
                            "tensor = 4 devices\n")
    assert not list(tmp_path.glob("demo-*"))  # the demo checkpoint was not written
    assert decoded == cli.EXIT_FAILURE and "--decode-experts works on a single device" in decoded_err
    assert default == 0, default_err
    assert "mesh data=1, expert=2, tensor=2" in default_err and THROUGHPUT.search(default_err)


def test_chat_reads_the_message_from_stdin(demo_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Name three colours.\n"))
    assert cli.main(["chat", "--checkpoint", str(demo_checkpoint), "--reasoning-effort", "low", *NEW_TOKENS]) == 0
    out, err = capsys.readouterr()
    assert re.match(r"(analysis|commentary|final): ", out)
    assert RANDOM_WEIGHTS_NOTE not in err  # a checkpoint was named
    assert THROUGHPUT.search(err)


def typing(messages: list[str]) -> Callable[[str], str]:
    """A stand-in for ``input``: the messages one by one, then Ctrl-D (EOFError)."""
    remaining = list(messages)

    def type_in(prompt: str) -> str:
        if not remaining:
            raise EOFError
        return remaining.pop(0)

    return type_in


def scripted_output(prompt: list[int], tokens: list[int]) -> GenerationOutput:
    """What a stand-in for ``generate`` returns for one prompt and its reply (one second each phase)."""
    return GenerationOutput([tokens], None, GenerationStats(len(prompt), 1.0, len(tokens), 1.0, 0.0))


def test_interactive_chat_turns_sample_with_their_own_seeds_and_cut_replies_are_marked(
    demo_checkpoint, capsys, monkeypatch
):
    tokenizer = Tokenizer.from_pretrained_dir(demo_checkpoint)
    answer = tokenizer.encode("<|channel|>final<|message|>Paris.", allowed_special="all")
    # The first reply ends at <|return|>; the second has --max-new-tokens tokens, none a stop.
    replies = [answer + [tokenizer.special_token_id(name)] for name in ("<|return|>", "<|end|>")]
    seeds = []

    def scripted_generate(model, prompts, *, max_new_tokens, seed, streamer, **kwargs):
        tokens = replies[len(seeds)][:max_new_tokens]
        seeds.append(seed)
        if len(seeds) == 2:
            time.sleep(3 * cli_generation.QUIET_START_SECONDS)
        for token in tokens:
            streamer(np.array([token]), np.array([True]))
        return scripted_output(prompts[0], tokens)

    monkeypatch.setattr("gptoss_jax.generate.generate", scripted_generate)
    monkeypatch.setattr("sys.stdin", FakeTerminal())
    monkeypatch.setattr("builtins.input", typing(["What is the capital of France?", "And again?"]))
    # The second reply's first token comes after the quiet start: a status line says why.
    monkeypatch.setattr(cli_generation, "QUIET_START_SECONDS", 0.5)
    max_new_tokens = len(answer) + 1
    assert cli.main(["chat", "--checkpoint", str(demo_checkpoint), "--seed", str(SEED_LIMIT - 1),
                     "--max-new-tokens", str(max_new_tokens)]) == 0
    out, err = capsys.readouterr()

    assert seeds == [SEED_LIMIT - 1, 0]  # --seed, then --seed + 1 modulo 2**32
    assert out.count("final: Paris.\n") == 2
    lines = err.splitlines()
    assert lines.count(COMPILING) == 1  # before the first turn only
    assert lines.count(QUIET_START) == 1 and lines.index(QUIET_START) > lines.index(COMPILING)
    _, second_reply_end = [i for i, line in enumerate(lines) if THROUGHPUT.match(line)]
    assert lines.index(f"[stopped at --max-new-tokens {max_new_tokens} before the reply ended]") == second_reply_end - 1


def test_ctrl_c_in_an_interactive_chat_stops_the_reply_and_drops_the_turn(demo_checkpoint, capsys, monkeypatch):
    tokenizer = Tokenizer.from_pretrained_dir(demo_checkpoint)
    answer = tokenizer.encode("<|channel|>final<|message|>Paris.", allowed_special="all")
    prompts = []

    def scripted_generate(model, prompts_, *, streamer, **kwargs):
        prompts.append(tokenizer.decode(prompts_[0]))
        tokens = []
        for token in answer:  # the first reply streams until the streamer asks to stop
            tokens.append(token)
            if streamer(np.array([token]), np.array([True])):
                break
        return scripted_output(prompts_[0], tokens)

    ctrl_c = iter([True])  # pressed once, while the first reply is being generated

    def wait_for(event, timeout=None):
        if next(ctrl_c, False):
            raise KeyboardInterrupt
        return event.wait(timeout)

    monkeypatch.setattr("gptoss_jax.generate.generate", scripted_generate)
    monkeypatch.setattr(cli_generation, "_wait_for", wait_for)
    monkeypatch.setattr("sys.stdin", FakeTerminal())
    monkeypatch.setattr("builtins.input", typing(["What is the capital of France?", "And of Italy?"]))
    assert cli.main(["chat", "--checkpoint", str(demo_checkpoint)]) == 0  # not 130: the chat went on
    err = capsys.readouterr().err

    assert "[reply stopped; this turn is left out of the conversation]" in err.splitlines()
    assert QUIET_START not in err  # the second reply started at once
    assert len(prompts) == 2 and "France" not in prompts[1] and "Italy" in prompts[1]


def test_reply_printer_shows_analysis_apart_from_the_final_answer():
    tokenizer = build_demo_tokenizer(2048)
    reply = tokenizer.encode(
        "<|channel|>analysis<|message|>Paris, surely.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>",
        allowed_special="all",
    )
    stream = io.StringIO()
    printer = cli_chat.ReplyPrinter(tokenizer, stream)
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
        pytest.param(["generate", "hello", "--kernels", "pallas"], "--kernels pallas needs an NVIDIA GPU of sm_80",
                     marks=pytest.mark.skipif(kernel_gpu_missing() is None, reason="this GPU runs the kernels")),
    ],
)
def test_bad_input_gives_one_error_line(argv, complaint, tmp_path, capsys):
    argv = [arg.format(missing=tmp_path / "missing") for arg in argv]
    assert cli.main(argv) == cli.EXIT_FAILURE
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("gptoss-jax: error: ") and complaint in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_closed_stdin_is_no_input(command, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", None)  # what Python makes of a closed stdin (`<&-`)
    assert cli.main([command]) == cli.EXIT_FAILURE
    what = "prompt" if command == "generate" else "message"
    assert capsys.readouterr().err == f"gptoss-jax: error: no {what} given: pass it as an argument or pipe it to stdin\n"


@pytest.mark.parametrize("seed", ["99999999999999999999", str(2**32), "-1", "seven"])
def test_a_seed_out_of_range_is_a_usage_error(seed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "hello", "--seed", seed])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("gptoss-jax generate: error: argument --seed: must be ")


def test_the_largest_seed_is_accepted():
    assert cli.build_parser().parse_args(["generate", "--seed", str(SEED_LIMIT - 1)]).seed == 2**32 - 1


def test_processes_without_a_coordinator_give_one_error_line(tmp_path):
    # In a fresh process: JAX joins a multi-host run only before its backends start.
    commands = [["generate", "hello", "--num-processes", "2", "--process-id", "0"]]
    env = {name: value for name, value in _python_env(tmp_path).items() if not name.startswith("JAX_COORDINATOR")}
    result = subprocess.run([sys.executable, "-c", RUN_COMMANDS, json.dumps(commands)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    [(status, err)] = json.loads(result.stdout.splitlines()[-1])
    assert status == cli.EXIT_FAILURE
    assert len(err.splitlines()) == 1
    assert err.startswith("gptoss-jax: error: cannot start the multi-host run (coordinator_address should be defined.): "
                          "pass --coordinator HOST:PORT")


def test_a_folder_that_is_no_checkpoint_gives_one_error_line(tmp_path, capsys):
    # config.json is looked for first: the tokenizer's absence would say less.
    assert cli.main(["generate", "hello", "--checkpoint", str(tmp_path)]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == f"gptoss-jax: error: {tmp_path}: not a gpt-oss checkpoint folder (no config.json)\n"


def test_a_file_passed_as_checkpoint_names_its_folder(demo_checkpoint, capsys):
    config = demo_checkpoint / "config.json"
    assert cli.main(["generate", "hello", "--checkpoint", str(config)]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == (f"gptoss-jax: error: {config} is a file: pass the checkpoint folder "
                                       f"that holds it, {demo_checkpoint}\n")


@pytest.mark.parametrize("command", ["convert", "generate", "chat", "demo"])
def test_help_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: gptoss-jax {command}")
