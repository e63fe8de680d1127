"""The ``gptoss-jax`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and
sets ``run`` to the function doing the work; add new ones to ``SUBCOMMANDS``. Arguments shared
by several subcommands are declared by small ``_add_*_arguments(parser)`` helpers. Work
functions import what they need themselves, so ``--help`` stays instant. Expected failures (a
bad checkpoint, an existing destination, an empty prompt...) print one line
``gptoss-jax: error: ...`` and exit 1; argparse's usage errors exit 2.

Generated text goes to stdout; progress, notes and throughput go to stderr. When the reader of
stdout goes away (``gptoss-jax generate ... | head``), generation stops and the command exits
quietly with status 141, as a Unix tool ended by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from gptoss_jax.errors import GptOssError

if TYPE_CHECKING:
    import jax

    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.generate import GenerationOutput, GenerationStats
    from gptoss_jax.harmony import Conversation, Message
    from gptoss_jax.model import GptOss
    from gptoss_jax.tokenizer import Tokenizer

PROG = "gptoss-jax"
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
# What a shell reports for a command that SIGPIPE ended, as it ends `yes | head`: a script
# with `set -o pipefail` sees the same status as for a Unix tool, not this CLI's error status.
EXIT_BROKEN_PIPE = 141

DEMO_MESSAGE = "What is the capital of France? Answer in one sentence."
DEMO_MAX_NEW_TOKENS = 48
RANDOM_WEIGHTS_NOTE = (
    "note: the embedded demo model has random weights, so its text is gibberish; "
    "pass --checkpoint for a real gpt-oss checkpoint"
)
# jax.random.key keeps a seed's low 32 bits, so larger seeds would repeat smaller ones.
SEED_LIMIT = 2**32
# A later chat turn whose first token takes longer than this says why: its longer prompt (or
# cache) compiles anew, which takes a while with a big model.
QUIET_START_SECONDS = 2.0
# Stops of a raw completion: the end of a document, and of a Harmony answer.
COMPLETION_STOP_TOKENS = ("<|endoftext|>", "<|return|>")


class InputError(GptOssError):
    """Bad command-line input, reported as one line."""


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report_interrupted() -> int:
    _status(f"{PROG}: interrupted")
    return EXIT_INTERRUPTED


# ----------------------------------------------------------------------------------------------
# convert


def _run_convert(args: argparse.Namespace) -> int:
    from convert import ConversionWarning, convert_checkpoint

    show_other_warning = warnings.showwarning

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        # The converter's warnings are for the user: one line, without Python's file and line.
        if issubclass(category, ConversionWarning):
            _status(f"{PROG}: warning: {message}")
        else:
            show_other_warning(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning afterwards
        warnings.showwarning = show_warning
        destination = convert_checkpoint(args.src, args.dst, progress=not args.no_progress)
    print(f"wrote {destination}")
    return 0


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a gpt-oss safetensors checkpoint into this project's format",
        description=(
            "Convert a gpt-oss safetensors checkpoint into this project's orbax checkpoint. "
            "SRC is either a Hugging Face root folder (config.json with model_type gpt_oss, "
            "model.safetensors or shards with model.safetensors.index.json) or OpenAI's "
            "original/ folder (config.json and model.safetensors); the layout is detected. "
            "Every tensor name, shape and dtype is checked against config.json before any "
            "weight is read, tensors are streamed one at a time, and DST appears only once "
            "complete: on any error nothing is left behind. tokenizer.json is copied along "
            "from SRC (from its parent for an original/ folder, as gpt-oss's Hugging Face "
            "repositories keep it), with a warning when there is none. Load the result with gptoss_jax.load(DST)."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="the safetensors checkpoint folder to read")
    parser.add_argument("dst", metavar="DST", help="the folder to create (it must not exist; missing parent folders are made)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar on stderr")
    parser.set_defaults(run=_run_convert)


# ----------------------------------------------------------------------------------------------
# Arguments shared by generate, chat and demo


def _add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", metavar="DIR",
        help="checkpoint folder: converted, HF root or original/ (its tokenizer.json in the folder, "
             "or for original/ in its parent) (default: the embedded demo model, made on the spot)",
    )


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="compute dtype (default: bfloat16)")
    parser.add_argument(
        "--kernels", choices=("auto", "pallas", "xla"), default="auto",
        help="pallas: the Pallas Mosaic-GPU kernels for attention and the MXFP4 experts wherever the "
             "model's shapes fit them (gpt-oss's always do; the status line says which run), the plain-XLA "
             "reference elsewhere; needs an NVIDIA Hopper GPU (sm_90 or newer). xla: the XLA reference "
             "everywhere. auto: pallas on a Hopper GPU, else xla; the GPTOSS_JAX_KERNELS environment "
             "variable overrides auto (default: auto)")
    parser.add_argument(
        "--decode-experts", action="store_true",
        help="keep a bfloat16 copy of the expert weights beside the packed MXFP4 ones, which the XLA path "
             "reads instead of decoding MXFP4 at every step: about 2.2-2.6x faster decoding on a CPU "
             "(measured on the demo model), for about 4x the packed experts' memory on top of them (some "
             "38 GB more for gpt-oss-20b). Single device and XLA path only: the Pallas expert kernel reads "
             "the packed weights")
    parser.add_argument("--mesh", metavar="SPEC",
                        help="device mesh, e.g. data=1,expert=4,tensor=2 (default: all devices; as many on "
                             "tensor as divide the model's KV heads, then as many on expert as its experts "
                             "and vocabulary divide over, the rest on data)")
    distributed = parser.add_argument_group(
        "multi-host", "run one process per host (JAX's distributed runtime); the JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables work too")
    distributed.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    distributed.add_argument("--num-processes", type=int, metavar="N", help="processes in all")
    distributed.add_argument("--process-id", type=int, metavar="I", help="this process's index")


def _seed(text: str) -> int:
    """argparse type of ``--seed``: an integer in ``[0, SEED_LIMIT)``."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= seed < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 0 to {SEED_LIMIT - 1}, got {seed}")
    return seed


def _add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int, turns: bool = False) -> None:
    """The sampling flags; ``turns``: the command may chat turn after turn (see ``--seed``)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help=f"the most tokens to generate (default: {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="sampling temperature; 0 for greedy decoding (default: 1.0)")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens only")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help="sample among the most likely tokens holding probability P")
    seed_help = f"random seed, 0 to {SEED_LIMIT - 1}; the same seed gives the same text"
    if turns:
        seed_help += (f"; turn after turn, the n-th turn (counting from 0) samples with SEED + n (modulo "
                      f"{SEED_LIMIT}), so that asking again gives a new answer")
    parser.add_argument("--seed", type=_seed, default=0, help=f"{seed_help} (default: 0)")


def _add_harmony_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium",
                        help="the system message's reasoning effort (default: medium)")
    parser.add_argument("--developer", "--system", dest="developer", metavar="TEXT",
                        help="instructions (what other chat formats call the system prompt), "
                             "sent as Harmony's developer message")
    parser.add_argument("--date", metavar="YYYY-MM-DD", default=datetime.date.today().isoformat(),
                        help="the system message's current date (default: today)")


def _check_generation_arguments(args: argparse.Namespace) -> None:
    """Reject bad sampling arguments before any model is loaded."""
    from gptoss_jax.sampling import SamplingConfig

    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise InputError(f"--{str(e).replace('_', '-')}") from None


def _checked_text(text: str, what: str) -> str:
    if not text.strip():
        raise InputError(f"the {what} is empty")
    return text


def _stdin_is_a_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()  # None: the process started with stdin closed


def _text_from_stdin(what: str) -> str:
    """The whole of stdin, which must be open and not a terminal (then the text was expected as an
    argument)."""
    if sys.stdin is None or _stdin_is_a_terminal():
        raise InputError(f"no {what} given: pass it as an argument or pipe it to stdin")
    return _checked_text(sys.stdin.read().rstrip("\n"), what)


def _mesh(args: argparse.Namespace, config: GptOssConfig) -> jax.sharding.Mesh | None:
    """``--mesh`` or the model's default mesh (none on one device), checked against the model."""
    import jax

    from gptoss_jax.sharding import check_mesh, make_mesh

    if args.mesh is None and jax.device_count() == 1:
        return None
    mesh = make_mesh(args.mesh, config=config)
    check_mesh(mesh, config)
    return mesh


def _start_distributed(args: argparse.Namespace) -> None:
    """Join JAX's distributed runtime when asked to, before anything touches a device."""
    asked = any(getattr(args, name, None) is not None for name in ("coordinator", "num_processes", "process_id"))
    if asked or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        from gptoss_jax.sharding import initialize_distributed

        try:
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        except ValueError as e:  # only JAX knows what a cluster manager would have filled in
            raise InputError(
                f"cannot start the multi-host run ({e}): pass --coordinator HOST:PORT, --num-processes N "
                "and --process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID) "
                "unless a cluster manager (Slurm, Open MPI, Kubernetes) sets them"
            ) from None


def _kernels_by_part(args: argparse.Namespace, config: GptOssConfig) -> dict[str, str]:
    """What runs attention and the experts (``pallas``, ``interpret`` or ``xla``) under ``--kernels``.

    The kernels take only the shapes they were written for; the model runs the XLA reference
    for the rest, so ``pallas`` may leave a part on XLA (the status line says so).
    """
    import jax
    import jax.numpy as jnp

    from gptoss_jax.kernel_dispatch import (
        ENV_VAR, attention_kernel_fits, has_hopper_gpu, moe_kernel_fits, resolve_kernels,
    )

    try:
        kernels = resolve_kernels(args.kernels)
    except ValueError as e:  # argparse checked the flag; this is the environment variable
        raise InputError(str(e)) from None
    if kernels == "pallas" and not has_hopper_gpu():
        asked = "--kernels pallas" if args.kernels == "pallas" else f"{ENV_VAR}=pallas"
        raise InputError(
            f"{asked} needs an NVIDIA Hopper GPU (sm_90 or newer), but the device is "
            f"{jax.devices()[0].device_kind}; use --kernels xla"
        )
    dtype = getattr(jnp, args.dtype)
    fits = {"attention": attention_kernel_fits(config, dtype), "experts": moe_kernel_fits(config, dtype)}
    return {part: kernels if fit else "xla" for part, fit in fits.items()}


def _describe_kernels(kernels: dict[str, str]) -> str:
    if len(set(kernels.values())) == 1:
        return f"kernels {next(iter(kernels.values()))}"
    return "kernels: " + ", ".join(f"{part} {choice}" for part, choice in kernels.items())


def _check_decode_experts(mesh: jax.sharding.Mesh | None, kernels: dict[str, str]) -> None:
    """Refuse ``--decode-experts`` where the model could not or would not read the copy."""
    if mesh is not None:
        raise InputError("--decode-experts works on a single device, but this run uses a mesh of "
                         f"{mesh.devices.size} devices")
    if kernels["experts"] != "xla":
        raise InputError(f"--decode-experts is for the XLA path, but the {kernels['experts']} expert kernel "
                         "runs here and reads the packed weights; add --kernels xla")


def _load_model_and_tokenizer(args: argparse.Namespace) -> tuple[GptOss, Tokenizer]:
    """The model and tokenizer of ``--checkpoint``, or of the embedded demo checkpoint.

    What can be checked without the weights is checked before they are read (the tokenizer,
    the mesh and kernels against the model's sizes), and before the demo checkpoint is written.
    """
    import jax.numpy as jnp

    import gptoss_jax
    from gptoss_jax.checkpoint import CONFIG_FILENAME, checked_checkpoint_folder
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.demo import demo_config, ensure_demo_checkpoint
    from gptoss_jax.tokenizer import Tokenizer

    if args.checkpoint is None:
        config = demo_config()
    else:
        folder = checked_checkpoint_folder(args.checkpoint)
        config = GptOssConfig.from_json_file(folder / CONFIG_FILENAME)  # every layout has one
        tokenizer = Tokenizer.from_pretrained_dir(folder)
    mesh = _mesh(args, config)
    kernels = _kernels_by_part(args, config)
    if args.decode_experts:
        _check_decode_experts(mesh, kernels)
    if args.checkpoint is None:
        folder = ensure_demo_checkpoint(
            on_create=lambda path: _status(f"writing the embedded demo checkpoint to {path}")
        )
        _status(RANDOM_WEIGHTS_NOTE)
        tokenizer = Tokenizer.from_pretrained_dir(folder)
    settings = [args.dtype, _describe_kernels(kernels)]
    if mesh is not None:
        settings.append("mesh " + ", ".join(f"{axis}={size}" for axis, size in mesh.shape.items()))
    _status(f"loading {folder} ({'; '.join(settings)}) ...")
    start = time.perf_counter()
    model = gptoss_jax.load(folder, dtype=getattr(jnp, args.dtype), kernels=args.kernels, mesh=mesh, progress=True)
    if args.decode_experts:
        model.decode_experts()
    _status(f"loaded in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def _generate(
    model: GptOss, prompt: list[int], args: argparse.Namespace, stop_tokens: Sequence[int],
    on_token: Callable[[int], None], *, turn: int = 0,
) -> tuple[GenerationOutput, bool]:
    """Generate from one prompt, handing each token to ``on_token`` as it comes.

    Returns the output and whether Ctrl-C cut generation short; the caller finishes its output,
    then raises KeyboardInterrupt, so that ``main`` reports it (an interactive chat goes on to
    the next prompt instead). ``turn`` counts the generations of an interactive chat from 0:
    each samples with its own seed, ``--seed`` plus ``turn``.

    The compiled decode loop keeps the thread that runs it until the loop ends, and Python runs
    its Ctrl-C handler only in the main thread, between bytecodes. So generation runs in a worker
    thread while the main thread waits; on Ctrl-C it asks the loop, through the streamer, to stop
    after its current step (a compilation or prefill under way finishes first).
    """
    from gptoss_jax.generate import GenerationInputError, generate

    stop, done = threading.Event(), threading.Event()
    replying = threading.Event()  # the first token came, or generation ended without one
    outcome: dict[str, Any] = {}

    def streamer(tokens, active) -> bool:
        replying.set()
        if active[0]:
            on_token(int(tokens[0]))
        return stop.is_set()

    def run() -> None:
        try:
            outcome["output"] = generate(
                model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=(args.seed + turn) % SEED_LIMIT, stop_tokens=stop_tokens,
                streamer=streamer,
            )
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e
        finally:
            replying.set()
            done.set()

    if turn == 0 and args.max_new_tokens > 0:
        # The first generation of a process compiles (seconds, more for a big model) before any
        # token shows; later turns reuse the compiled code unless their shapes grow.
        _status("compiling and prefilling ...")
    # A daemon, so that a second Ctrl-C ends the process without waiting for the loop.
    threading.Thread(target=run, name="generate", daemon=True).start()
    try:
        if turn > 0 and args.max_new_tokens > 0 and not _wait_for(replying, timeout=QUIET_START_SECONDS):
            _status("prefilling ... (a longer conversation compiles once more)")
        _wait_for(done)
    except KeyboardInterrupt:
        stop.set()
        _status("stopping after the current step; Ctrl-C again quits at once")
        try:
            _wait_for(done)
        except KeyboardInterrupt:
            _quit_now()
    error = outcome.get("error")
    if isinstance(error, GenerationInputError):  # e.g. a prompt longer than the context
        raise InputError(str(error)) from None
    if error is not None:
        raise error
    return outcome["output"], stop.is_set()


def _quit_now() -> NoReturn:
    """Exit without waiting for the generation thread.

    A normal exit tears the interpreter down under the thread, which can crash the process
    (SIGSEGV, SIGABRT) while the thread is inside XLA, compiling or calling back the streamer.
    """
    sys.stdout.flush()
    os._exit(_report_interrupted())


def _wait_for(event: threading.Event, timeout: float | None = None) -> bool:
    """Wait until ``event`` is set (True) or ``timeout`` seconds have passed (False)."""
    # Short waits in a loop, so that Ctrl-C reaches the main thread at once on every platform. Not
    # Thread.join: on Python 3.12 a KeyboardInterrupt inside join marks the running thread as ended.
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    while not event.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            return False
    return True


def _report_throughput(stats: GenerationStats) -> None:
    def phase(name: str, tokens: int, tokens_per_second: float) -> str:
        # max_new_tokens=0 runs nothing, not even the prefill: no rate to show.
        return f"{name}: {tokens} tokens, {tokens_per_second:.1f} tokens/s" if tokens else f"{name}: 0 tokens"

    _status(
        f"{phase('prefill', stats.prefill_tokens, stats.prefill_tokens_per_second)} | "
        f"{phase('decode', stats.decode_tokens, stats.decode_tokens_per_second)} | "
        f"compile: {stats.compile_seconds:.1f} s"
    )


# ----------------------------------------------------------------------------------------------
# generate


def _run_generate(args: argparse.Namespace) -> int:
    import codecs

    prompt = _checked_text(args.prompt, "prompt") if args.prompt is not None else _text_from_stdin("prompt")
    _check_generation_arguments(args)
    model, tokenizer = _load_model_and_tokenizer(args)
    stops = [tokenizer.special_tokens[name] for name in COMPLETION_STOP_TOKENS if name in tokenizer.special_tokens]
    # Tokens can split a UTF-8 character; the incremental decoder holds the bytes until it is whole.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(token: int) -> None:
        if token not in stops:
            sys.stdout.write(utf8.decode(tokenizer.decode_bytes([token])))
            sys.stdout.flush()

    output, interrupted = _generate(model, tokenizer.encode(prompt), args, stops, show)
    print(utf8.decode(b"", final=True))
    _report_throughput(output.stats)
    if interrupted:
        raise KeyboardInterrupt
    return 0


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue a text (raw completion, no chat format)",
        description=(
            "Continue PROMPT (or stdin) with the model and stream the new text to stdout. No chat "
            "format is applied; generation stops at <|endoftext|> or <|return|>. Prefill and "
            "decode throughput go to stderr at the end."
        ),
    )
    parser.add_argument("prompt", nargs="?", metavar="PROMPT", help="the text to continue (default: stdin)")
    _add_checkpoint_argument(parser)
    _add_sampling_arguments(parser, max_new_tokens=128)
    _add_runtime_arguments(parser)
    parser.set_defaults(run=_run_generate)


# ----------------------------------------------------------------------------------------------
# chat


class _ReplyPrinter:
    """Parses a Harmony reply token by token and writes its text in sections by channel.

    Sections are labelled ``analysis:``, ``final:``...; on a terminal the labels are bold and
    the analysis (chain of thought) is dim, elsewhere the text is plain. A message without a
    channel (only malformed output has one) is shown as the answer. Parsing is lenient: a model
    may emit anything (the random demo model does), and the chat shows it rather than fail.
    """

    _BOLD, _DIM, _RESET = "\033[1m", "\033[2m", "\033[0m"

    def __init__(self, tokenizer: Tokenizer, stream: TextIO) -> None:
        from gptoss_jax.harmony import StreamParser

        self._parser = StreamParser(tokenizer, strict=False)
        self._stream = stream
        self._styled = stream.isatty() and "NO_COLOR" not in os.environ
        self._section: str | None = None

    def process(self, token: int) -> None:
        """Parse one generated token and write the text it adds."""
        messages_before = len(self._parser.messages)
        delta = self._parser.process(token)
        self._write(self._delta_channel(messages_before), delta)

    def finish(self) -> tuple[Message, ...]:
        """Complete a reply cut off by the token limit; returns the reply's messages."""
        messages_before = len(self._parser.messages)
        self._parser.process_eos()
        self._write(self._delta_channel(messages_before), self._parser.last_content_delta)
        self._end_section()
        self._stream.flush()
        return self._parser.messages

    def _delta_channel(self, messages_before: int) -> str | None:
        # The text just returned may have ended a message; then it belongs to that message.
        if len(self._parser.messages) > messages_before:
            return self._parser.messages[-1].channel
        return self._parser.current_channel

    def _write(self, channel: str | None, text: str) -> None:
        if not text:
            return
        section = channel or "final"
        if section != self._section:
            self._end_section()
            label = f"{section}:"
            self._stream.write(f"{self._BOLD}{label}{self._RESET} " if self._styled else f"{label} ")
            if self._styled and section == "analysis":
                self._stream.write(self._DIM)
            self._section = section
        self._stream.write(text)
        self._stream.flush()

    def _end_section(self) -> None:
        if self._section is None:
            return
        if self._styled:
            self._stream.write(self._RESET)
        self._stream.write("\n")
        self._section = None


def _chat_preamble(reasoning_effort: str, developer: str | None, date: str) -> Conversation:
    """The system message (and the developer message when there are instructions)."""
    from gptoss_jax.harmony import Conversation, DeveloperContent, Message, Role, SystemContent

    try:
        datetime.date.fromisoformat(date)
    except ValueError:
        raise InputError(f"--date must be YYYY-MM-DD, got {date!r}") from None
    messages = [Message(Role.SYSTEM, SystemContent(reasoning_effort=reasoning_effort, conversation_start_date=date))]
    if developer is not None:
        messages.append(Message(Role.DEVELOPER, DeveloperContent(instructions=developer)))
    return Conversation(tuple(messages))


def _chat_turn(
    model: GptOss, tokenizer: Tokenizer, conversation: Conversation, user_message: str,
    args: argparse.Namespace, *, turn: int = 0,
) -> Conversation | None:
    """Answer ``user_message``, streaming the reply to stdout; returns the longer conversation,
    or None when Ctrl-C cut the reply short.

    ``turn`` counts the turns of an interactive chat from 0 (see :func:`_generate`).
    """
    from gptoss_jax.harmony import Message, Role, encode_for_completion, stop_token_ids

    conversation = conversation.extended([Message(Role.USER, user_message)])
    printer = _ReplyPrinter(tokenizer, sys.stdout)
    stops = stop_token_ids(tokenizer)
    output, interrupted = _generate(model, encode_for_completion(conversation, tokenizer), args, sorted(stops),
                                    printer.process, turn=turn)
    reply = printer.finish()
    tokens = output.tokens[0]
    if not interrupted and len(tokens) == args.max_new_tokens and tokens and tokens[-1] not in stops:
        _status(f"[stopped at --max-new-tokens {args.max_new_tokens} before the reply ended]")
    _report_throughput(output.stats)
    if interrupted:
        return None
    # The rendering of the next prompt drops this turn's analysis once a user message follows
    # its final answer (Harmony's rule), so every message goes into the history.
    return conversation.extended(reply)


def _interactive_chat(model: GptOss, tokenizer: Tokenizer, conversation: Conversation, args: argparse.Namespace) -> None:
    """Turn after turn until Ctrl-D. Ctrl-C during a reply stops it and drops the turn (a cut
    reply would mislead the model later); Ctrl-C at the prompt quits."""
    _status("type a message and press Enter; Ctrl-C stops a reply, Ctrl-D quits")
    turn = 0
    while True:
        try:
            message = input(">>> ")
        except EOFError:
            print()
            return
        if message.strip():
            answered = _chat_turn(model, tokenizer, conversation, message, args, turn=turn)
            if answered is None:
                _status("[reply stopped; this turn is left out of the conversation]")
            else:
                conversation = answered
            turn += 1


def _run_chat(args: argparse.Namespace) -> int:
    interactive = args.message is None and _stdin_is_a_terminal()
    message = None
    if not interactive:
        message = _checked_text(args.message, "message") if args.message is not None else _text_from_stdin("message")
    _check_generation_arguments(args)
    conversation = _chat_preamble(args.reasoning_effort, args.developer, args.date)
    model, tokenizer = _load_model_and_tokenizer(args)
    if interactive:
        _interactive_chat(model, tokenizer, conversation, args)
    elif _chat_turn(model, tokenizer, conversation, message, args) is None:
        raise KeyboardInterrupt  # main reports it
    return 0


def _add_chat(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat in the Harmony format, showing the reasoning apart from the answer",
        description=(
            "Answer MESSAGE in the Harmony chat format and stream the reply to stdout: the "
            "analysis channel (the model's reasoning) apart from the final answer. Generation "
            "stops at <|return|> or <|call|>. Without MESSAGE, reads the message from stdin, or "
            "on a terminal chats turn after turn (Ctrl-C stops a reply, Ctrl-D quits). Prefill and "
            "decode throughput go to stderr after each reply, after a note when --max-new-tokens cut "
            "the reply off."
        ),
    )
    parser.add_argument("message", nargs="?", metavar="MESSAGE", help="the user's message (default: stdin)")
    _add_checkpoint_argument(parser)
    _add_harmony_arguments(parser)
    _add_sampling_arguments(parser, max_new_tokens=1024, turns=True)
    _add_runtime_arguments(parser)
    parser.set_defaults(run=_run_chat)


# ----------------------------------------------------------------------------------------------
# demo


def _run_demo(args: argparse.Namespace) -> int:
    _check_generation_arguments(args)
    conversation = _chat_preamble("low", None, datetime.date.today().isoformat())
    model, tokenizer = _load_model_and_tokenizer(args)
    _status(f"user: {DEMO_MESSAGE}")
    _chat_turn(model, tokenizer, conversation, DEMO_MESSAGE, args)
    return 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="one chat turn on the embedded demo model (no download)",
        description=(
            "Run the whole pipeline on a fresh machine: write a small gpt-oss-shaped checkpoint "
            "with random weights (once; it is cached), load it, answer a fixed message in the "
            "Harmony chat format with streaming, and print the throughput. The weights are "
            "random, so the reply is gibberish."
        ),
    )
    _add_sampling_arguments(parser, max_new_tokens=DEMO_MAX_NEW_TOKENS)
    _add_runtime_arguments(parser)
    parser.set_defaults(run=_run_demo, checkpoint=None)


# ----------------------------------------------------------------------------------------------
# serve


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from gptoss_jax.serving.serve import serve
    except ImportError as error:
        raise InputError(f"serve needs the serve extra ({error.name} is missing): "
                         "pip install 'gptoss-jax[serve]'") from None
    model_name = args.served_model_name or ("demo" if args.checkpoint is None else _checkpoint_name(args.checkpoint))
    engine_options = dict(max_batch=args.max_batch, max_context=args.max_context, prefill_chunk=args.prefill_chunk,
                          max_queue=args.max_queue)
    serve(lambda: _load_model_and_tokenizer(args), model_name=model_name, host=args.host,
          port=args.port, api_key=args.api_key, engine_options=engine_options)
    return 0


def _checkpoint_name(checkpoint: str) -> str:
    """The model name a checkpoint folder is served as: its folder's name (the parent's for original/)."""
    from pathlib import Path

    folder = Path(checkpoint).resolve()
    return folder.parent.name if folder.name == "original" else folder.name


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat completions, responses, completions)",
        description=(
            "Serve the model over HTTP with OpenAI's API (POST /v1/chat/completions, /v1/responses, "
            "/v1/completions; GET /v1/models, /health, /metrics), on the continuous-batching engine: "
            "requests are batched as they arrive. The port is bound at once and answers 503 while the "
            "model loads; one line on stderr says when it is ready. Ctrl-C or SIGTERM stops it (running "
            "streams end with an error event). Needs the serve extra: pip install 'gptoss-jax[serve]'."
        ),
    )
    _add_checkpoint_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name clients use (default: the checkpoint folder's name, or demo)")
    parser.add_argument("--max-batch", type=_positive, default=16,
                        help="requests decoded at once, the KV cache's rows (default: 16)")
    parser.add_argument("--max-context", type=_positive, default=4096,
                        help="positions per request: prompt plus generated tokens (default: 4096)")
    parser.add_argument("--prefill-chunk", type=_positive, default=256,
                        help="prompt tokens per prefill step, a power of two (default: 256)")
    parser.add_argument("--max-queue", type=_positive, default=1024,
                        help="requests that may wait for a slot; more are answered 429 (default: 1024)")
    _add_runtime_arguments(parser)
    parser.set_defaults(run=_run_serve, decode_experts=False)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_convert, _add_generate, _add_chat, _add_demo, _add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of ``SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(prog=PROG, description="gpt-oss-20b and gpt-oss-120b in JAX.")
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def _enable_compilation_cache() -> None:
    """Keep compiled programs on disk between runs (compiling dominates a short CPU run).

    A cache folder the user configured for JAX is left as it is.
    """
    import jax

    from gptoss_jax.demo import cache_root

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "jax-compilation"))


def _is_secondary_process() -> bool:
    import jax

    return jax.process_count() > 1 and jax.process_index() != 0


def _silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, so that flushing it at exit cannot fail again."""
    try:
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError):  # main() called with sys.stdout replaced by an object in memory
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script passes it to exit)."""
    args = build_parser().parse_args(argv)
    _enable_compilation_cache()
    try:
        _start_distributed(args)
        if _is_secondary_process():
            # Every process runs the same program; one of them speaks.
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                return args.run(args)
        return args.run(args)
    except KeyboardInterrupt:
        return _report_interrupted()
    except BrokenPipeError:  # generate re-raises it from the streamer, after stopping the loop
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (GptOssError, OSError) as e:  # the user's input or files: no traceback
        message = " ".join(str(e).split())  # one line, whatever the exception's formatting
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
