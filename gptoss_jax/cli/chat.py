"""The Harmony chat: the ``chat`` and ``demo`` subcommands, turn after turn, with the reply printer."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import TYPE_CHECKING, TextIO

from gptoss_jax.cli.arguments import (
    add_checkpoint_argument,
    add_harmony_arguments,
    add_runtime_arguments,
    add_sampling_arguments,
    check_generation_arguments,
    open_model_for,
)
from gptoss_jax.cli.generation import generate_streaming, report_throughput
from gptoss_jax.cli.terminal import InputError, checked_text, status, stdin_is_a_terminal, text_from_stdin

if TYPE_CHECKING:
    from gptoss_jax.harmony import Conversation, Message
    from gptoss_jax.model import GptOss
    from gptoss_jax.tokenizer import Tokenizer

DEMO_MESSAGE = "What is the capital of France? Answer in one sentence."
DEMO_MAX_NEW_TOKENS = 48


class ReplyPrinter:
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

    ``turn`` counts the turns of an interactive chat from 0 (see :func:`generate_streaming`).
    """
    from gptoss_jax.harmony import Message, Role, drop_answered_analysis, encode_for_completion, stop_token_ids

    conversation = conversation.extended([Message(Role.USER, user_message)])
    printer = ReplyPrinter(tokenizer, sys.stdout)
    stops = stop_token_ids(tokenizer)
    prompt = encode_for_completion(drop_answered_analysis(conversation), tokenizer, auto_drop_analysis=False)
    output, interrupted = generate_streaming(model, prompt, args, sorted(stops), printer.process, turn=turn)
    reply = printer.finish()
    tokens = output.tokens[0]
    if not interrupted and len(tokens) == args.max_new_tokens and tokens and tokens[-1] not in stops:
        status(f"[stopped at --max-new-tokens {args.max_new_tokens} before the reply ended]")
    report_throughput(output.stats)
    if interrupted:
        return None
    # The rendering of the next prompt drops this turn's analysis once a user message follows
    # its final answer (Harmony's rule), so every message goes into the history.
    return conversation.extended(reply)


def _interactive_chat(model: GptOss, tokenizer: Tokenizer, conversation: Conversation, args: argparse.Namespace) -> None:
    """Turn after turn until Ctrl-D. Ctrl-C during a reply stops it and drops the turn (a cut
    reply would mislead the model later); Ctrl-C at the prompt quits."""
    status("type a message and press Enter; Ctrl-C stops a reply, Ctrl-D quits")
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
                status("[reply stopped; this turn is left out of the conversation]")
            else:
                conversation = answered
            turn += 1


def _run_chat(args: argparse.Namespace) -> int:
    interactive = args.message is None and stdin_is_a_terminal()
    message = None
    if not interactive:
        message = checked_text(args.message, "message") if args.message is not None else text_from_stdin("message")
    check_generation_arguments(args)
    conversation = _chat_preamble(args.reasoning_effort, args.developer, args.date)
    opened = open_model_for(args)
    model, tokenizer = opened.model, opened.tokenizer
    if interactive:
        _interactive_chat(model, tokenizer, conversation, args)
    elif _chat_turn(model, tokenizer, conversation, message, args) is None:
        raise KeyboardInterrupt  # main reports it
    return 0


def add_chat(subparsers: argparse._SubParsersAction) -> None:
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
    add_checkpoint_argument(parser)
    add_harmony_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=1024, turns=True)
    add_runtime_arguments(parser)
    parser.set_defaults(run=_run_chat)


# ----------------------------------------------------------------------------------------------
# demo


def _run_demo(args: argparse.Namespace) -> int:
    check_generation_arguments(args)
    conversation = _chat_preamble("low", None, datetime.date.today().isoformat())
    opened = open_model_for(args)
    model, tokenizer = opened.model, opened.tokenizer
    status(f"user: {DEMO_MESSAGE}")
    _chat_turn(model, tokenizer, conversation, DEMO_MESSAGE, args)
    return 0


def add_demo(subparsers: argparse._SubParsersAction) -> None:
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
    add_sampling_arguments(parser, max_new_tokens=DEMO_MAX_NEW_TOKENS)
    add_runtime_arguments(parser)
    parser.set_defaults(run=_run_demo, checkpoint=None)
