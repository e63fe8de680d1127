"""Every command that README.md and docs/*.md give runs, in a cheap form; every Python example runs.

The fenced blocks are read afresh each run, so a command added to any of these files is checked
without touching this test. A shell block (``bash``, ``sh``, ``shell``, ``console``) is split
into commands: a line, with its ``\\`` continuations and open quotes joined, ``#`` comments and
leading ``VAR=value`` assignments dropped, each stage of a ``|`` pipeline a command of its own.
Each command must match a rule:

* ``gptoss-jax SUB ...`` (or ``.venv/bin/gptoss-jax``): ``gptoss-jax SUB --help`` runs, and
  every ``--flag`` the line gives is in that help. ``env`` runs for real (seconds, no weight
  read), with ``path/to/...`` replaced by the demo checkpoint.
* ``python``, ``python3`` or ``.venv/bin/python``: ``-m MODULE ...`` gets the same check with
  ``python -m MODULE --help`` (``REAL_MODULES`` run for real); ``-c CODE`` runs CODE as a Python
  example; ``python FILE ...`` runs ``python FILE --help`` from the repository root, so a
  documented file form that cannot import its package fails here.
* ``pip install`` (or ``.venv/bin/pip``): each ``[extra]`` it names is one of pyproject.toml's.
* ``bash SCRIPT``: the script exists and ``bash -n`` parses it (CI runs the two scripts itself).
* ``curl`` at ``localhost:8000``: runs for real, the address replaced by a server this test
  starts on the demo model (``--served-model-name gpt-oss-20b``, so the documented requests run
  as written). ``echo`` feeding a pipeline stands for its input; the next stage is checked.
* Anything else fails, naming the file and line, unless its block holds a key of ``ALLOWED``,
  each with the reason it cannot run here; a key that no block holds fails too.

A ``text`` or ``json`` block is shown, not run; a block of any other language, or of none, fails.
A Python block runs in a fresh interpreter on the CPU, from the repository root, with every
``"path/to/..."`` replaced by the demo checkpoint and ``127.0.0.1:8000`` by the test's server; an
example that builds a mesh (``make_mesh``) gets 8 CPU devices. Each block must stand alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from gptoss_jax.demo import ensure_demo_checkpoint

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
SHOWN_LANGUAGES = {"text", "json"}  # output and data, shown, never run
DOCUMENTED_ADDRESSES = ("127.0.0.1:8000", "localhost:8000")
SERVED_MODEL = "gpt-oss-20b"
ALLOWED = {
    "initialize_distributed('127.0.0.1:12355'": "two processes that rendezvous on a fixed TCP port; "
    "tests/test_sharding.py starts the same two processes on a free port",
}
# Module commands that take seconds, run as documented; those with other flags get --help.
REAL_MODULES = {"benchmarks.memory.budget": set(), "benchmarks.gpu.gpu_session": {"--list"}}
REAL_SUBCOMMANDS = {"env": {"--checkpoint", "--json", "--mesh"}}
TIMEOUT = 600
_FENCE = re.compile(r"^```(\w*)\s*$")
_PLACEHOLDER = re.compile(r"path/to/[\w./-]+")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the fence
    language: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with its language."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = _FENCE.match(line)
        if language is None and fence:
            language, start, lines = fence.group(1), number, []
        elif language is not None and line.strip() == "```":
            blocks.append(Block(path, start, language, "\n".join(lines) + "\n"))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"{path.relative_to(REPO)}:{start}: a fence is never closed"
    return blocks


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell block as argument lists (the module docstring says how)."""
    commands, pending = [], ""
    for line in text.splitlines():
        pending += line[:-1] + " " if line.endswith("\\") else line + "\n"
        if line.endswith("\\"):
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        pending = ""
        stage: list[str] = []
        for word in [*words, "|"]:
            if word == "|":
                while stage and _ASSIGNMENT.match(stage[0]):
                    stage.pop(0)
                if stage:
                    commands.append(stage)
                stage = []
            else:
                stage.append(word)
    assert not pending.strip(), f"an unfinished command: {pending!r}"
    return commands


def all_blocks() -> list[Block]:
    return [block for path in DOCUMENTS for block in fenced_blocks(path)]


def runnable(languages: set[str]) -> list[Block]:
    return [b for b in all_blocks() if b.language in languages and not any(key in b.text for key in ALLOWED)]


# ---------------------------------------------------------------------------------------------
# Running


def venv_program(name: str) -> str:
    """``python``, ``.venv/bin/X`` or a console script: the one of the interpreter running the tests."""
    if name in ("python", "python3", ".venv/bin/python", ".venv/bin/python3"):
        return sys.executable
    return str(Path(sys.executable).parent / Path(name).name)


def demo_substituted(text: str, address: str | None) -> str:
    text = _PLACEHOLDER.sub(str(ensure_demo_checkpoint()), text)
    if address is not None:
        for documented in DOCUMENTED_ADDRESSES:
            text = text.replace(documented, address)
    return text


def completed(argv: tuple[str, ...], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, **(env or {})})


def succeeded(result: subprocess.CompletedProcess, where: str) -> str:
    """The output of a command that must succeed; its failure names ``where`` (file and line)."""
    assert result.returncode == 0, (
        f"{where}: `{shlex.join(result.args)}` exited with {result.returncode}:\n"
        f"{result.stdout[-2000:]}{result.stderr[-4000:]}"
    )
    return result.stdout + result.stderr


def run(argv: list[str], where: str, *, env: dict[str, str] | None = None) -> str:
    return succeeded(completed(tuple(argv), env), where)


@functools.cache
def help_run(argv: tuple[str, ...]) -> subprocess.CompletedProcess:
    """``argv --help``, run once however many blocks give the command."""
    return completed((*argv, "--help"))


def help_text(argv: tuple[str, ...], where: str) -> str:
    return succeeded(help_run(argv), where)


def assert_flags_documented(command: list[str], help_argv: tuple[str, ...], where: str) -> None:
    text = help_text(help_argv, where)
    for flag in (word.split("=")[0] for word in command if word.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
            f"{where}: `{shlex.join(command)}`: {flag} is not in `{shlex.join(help_argv)} --help`"
        )


def extras() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])


class DocsServer:
    """``gptoss-jax serve`` on the demo model, on a free port, under the documented model name."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{s.getsockname()[1]}"
        port = self.address.split(":")[1]
        self.process = subprocess.Popen(
            [venv_program("gptoss-jax"), "serve", "--host", "127.0.0.1", "--port", port, "--served-model-name",
             SERVED_MODEL, "--max-batch", "2", "--max-context", "1024"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIMEOUT
        while not self.ready():
            assert self.process.poll() is None, f"the server stopped:\n{self.process.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.5)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


@pytest.fixture(scope="module")
def server_address():
    """The address of a server started for the blocks that talk to the documented one, at first use."""
    servers: list[DocsServer] = []

    def address() -> str:
        if not servers:
            servers.append(DocsServer())
        return servers[0].address

    yield address
    for server in servers:
        server.stop()


def needs_server(text: str) -> bool:
    return any(documented in text for documented in DOCUMENTED_ADDRESSES)


def check_command(command: list[str], where: str, address: str | None) -> None:
    program, arguments = command[0], command[1:]
    name = Path(program).name
    if name == "gptoss-jax":
        sub = next((word for word in arguments if not word.startswith("-")), None)
        help_argv = (venv_program(program), *((sub,) if sub else ()))
        assert_flags_documented(command, help_argv, where)
        flags = {word.split("=")[0] for word in arguments if word.startswith("--")}
        if sub in REAL_SUBCOMMANDS and flags <= REAL_SUBCOMMANDS[sub]:
            run([venv_program(program), *(demo_substituted(word, None) for word in arguments)], where)
    elif name in ("python", "python3"):
        if arguments[:1] == ["-c"]:
            run_python(arguments[1], where, address)
        elif arguments[:1] == ["-m"]:
            module, options = arguments[1], arguments[2:]
            assert_flags_documented(command, (sys.executable, "-m", module), where)
            flags = {word.split("=")[0] for word in options if word.startswith("-")}
            if module in REAL_MODULES and flags <= REAL_MODULES[module]:
                run([sys.executable, "-m", module, *options], where)
        else:
            help_text((sys.executable, arguments[0]), where)
    elif name == "pip":
        named = set(re.findall(r"\[([\w,-]+)\]", " ".join(arguments)))
        unknown = {extra for group in named for extra in group.split(",")} - extras()
        assert named and not unknown, f"{where}: `{shlex.join(command)}`: no such extra in pyproject.toml: {unknown}"
    elif name == "bash":
        script = REPO / arguments[0]
        assert script.is_file(), f"{where}: `{shlex.join(command)}`: no {arguments[0]}"
        run(["bash", "-n", str(script)], where)
    elif name == "curl" and address is not None:
        run(["curl", "--fail", "--silent", "--show-error", "--max-time", str(TIMEOUT),
             *(demo_substituted(word, address) for word in arguments)], where)
    elif name == "echo":
        pass  # feeds the next stage, which is checked
    else:
        pytest.fail(f"{where}: `{shlex.join(command)}`: no rule runs this command; give it one in "
                    f"{Path(__file__).name} or add its block to ALLOWED with the reason")


def run_python(code: str, where: str, address: str | None) -> None:
    env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    if "make_mesh" in code:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    run([sys.executable, "-c", demo_substituted(code, address)], where, env=env)


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("block", runnable(SHELL_LANGUAGES), ids=lambda b: b.where)
def test_documented_shell_commands_run(block, server_address):
    address = server_address() if needs_server(block.text) else None
    commands = shell_commands(block.text)
    assert commands, f"{block.where}: a shell block without a command"
    for command in commands:
        check_command(command, block.where, address)


@pytest.mark.parametrize("block", runnable({"python"}), ids=lambda b: b.where)
def test_documented_python_examples_run(block, server_address):
    run_python(block.text, block.where, server_address() if needs_server(block.text) else None)


def test_every_block_has_a_known_language():
    languages = SHELL_LANGUAGES | SHOWN_LANGUAGES | {"python"}
    unknown = [f"{b.where}: ```{b.language}" for b in all_blocks() if b.language not in languages]
    assert unknown == [], f"name each fenced block's language (one of {sorted(languages)}), or teach this test a new one"


def test_every_allowed_entry_is_still_documented():
    texts = [b.text for b in all_blocks()]
    assert [key for key in ALLOWED if not any(key in text for text in texts)] == []


def test_the_shell_splitting():
    text = ('A=1 B=2 python -m x --flag y   # comment\n'
            'echo "Hi." | gptoss-jax chat --developer "Be brief."\n'
            'curl host -d \'{"a": 1}\' \\\n  -H x\n'
            'python -c "\nprint(1)\n"\n')
    assert shell_commands(text) == [
        ["python", "-m", "x", "--flag", "y"],
        ["echo", "Hi."], ["gptoss-jax", "chat", "--developer", "Be brief."],
        ["curl", "host", "-d", '{"a": 1}', "-H", "x"],
        ["python", "-c", "\nprint(1)\n"],
    ]


def test_an_unknown_command_and_a_missing_flag_fail_loudly():
    with pytest.raises(pytest.fail.Exception, match="no rule runs this command"):
        check_command(["make", "all"], "here", None)
    with pytest.raises(AssertionError, match="--no-such-flag is not in"):
        check_command([sys.executable, "-m", "convert", "--no-such-flag"], "here", None)
    with pytest.raises(AssertionError, match="no such extra"):
        check_command(["pip", "install", "-e", ".[no-such-extra]"], "here", None)
