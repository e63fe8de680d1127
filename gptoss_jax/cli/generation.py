"""Generating in a worker thread, so that Ctrl-C reaches the main thread and stops it cleanly."""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from gptoss_jax.cli.arguments import SEED_LIMIT
from gptoss_jax.cli.terminal import InputError, report_interrupted, status

if TYPE_CHECKING:
    from gptoss_jax.generate import GenerationOutput, GenerationStats
    from gptoss_jax.model import GptOss

# A later chat turn whose first token takes longer than this says why: its longer prompt (or
# cache) compiles anew, which takes a while with a big model.
QUIET_START_SECONDS = 2.0


def generate_streaming(
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
        status("compiling and prefilling ...")
    # A daemon, so that a second Ctrl-C ends the process without waiting for the loop.
    threading.Thread(target=run, name="generate", daemon=True).start()
    try:
        if turn > 0 and args.max_new_tokens > 0 and not _wait_for(replying, timeout=QUIET_START_SECONDS):
            status("prefilling ... (a longer conversation compiles once more)")
        _wait_for(done)
    except KeyboardInterrupt:
        stop.set()
        status("stopping after the current step; Ctrl-C again quits at once")
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
    os._exit(report_interrupted())


def _wait_for(event: threading.Event, timeout: float | None = None) -> bool:
    """Wait until ``event`` is set (True) or ``timeout`` seconds have passed (False)."""
    # Short waits in a loop, so that Ctrl-C reaches the main thread at once on every platform. Not
    # Thread.join: on Python 3.12 a KeyboardInterrupt inside join marks the running thread as ended.
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    while not event.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            return False
    return True


def report_throughput(stats: GenerationStats) -> None:
    def phase(name: str, tokens: int, tokens_per_second: float) -> str:
        # max_new_tokens=0 runs nothing, not even the prefill: no rate to show.
        return f"{name}: {tokens} tokens, {tokens_per_second:.1f} tokens/s" if tokens else f"{name}: 0 tokens"

    status(
        f"{phase('prefill', stats.prefill_tokens, stats.prefill_tokens_per_second)} | "
        f"{phase('decode', stats.decode_tokens, stats.decode_tokens_per_second)} | "
        f"compile: {stats.compile_seconds:.1f} s"
    )
