"""The ``serve`` subcommand: the OpenAI-compatible HTTP server (:mod:`gptoss_jax.serving`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptoss_jax.cli.arguments import add_checkpoint_argument, add_runtime_arguments, open_model_for
from gptoss_jax.cli.terminal import InputError


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from gptoss_jax.serving.serve import serve
    except ImportError as error:
        raise InputError(f"serve needs the serve extra ({error.name} is missing): "
                         "pip install 'gptoss-jax[serve]'") from None
    model_name = args.served_model_name or ("demo" if args.checkpoint is None else checkpoint_name(args.checkpoint))
    engine_options = dict(max_batch=args.max_batch, max_context=args.max_context, prefill_chunk=args.prefill_chunk,
                          prefill_budget=args.prefill_budget, max_queue=args.max_queue,
                          prefix_caching=args.prefix_caching,
                          prefix_cache_bytes=None if args.prefix_cache_gb is None else int(args.prefix_cache_gb * 1e9))

    def load():
        opened = open_model_for(args)
        return opened.model, opened.tokenizer

    serve(load, model_name=model_name, host=args.host, port=args.port, api_key=args.api_key,
          engine_options=engine_options)
    return 0


def checkpoint_name(checkpoint: str) -> str:
    """The model name a checkpoint folder is served as: its folder's name (the parent's for original/)."""
    folder = Path(checkpoint).resolve()
    return folder.parent.name if folder.name == "original" else folder.name


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_serve(subparsers: argparse._SubParsersAction) -> None:
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
    add_checkpoint_argument(parser)
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
                        help="the most prompt tokens of one request per prefill step, a power of two (default: 256)")
    parser.add_argument("--prefill-budget", type=_positive, default=2048,
                        help="the most tokens one prefill step runs, over the chunks of several waiting prompts "
                             "(default: 2048)")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="compute every prompt in full (by default prompts' KV is kept in blocks of 128 tokens "
                             "and a new prompt's longest cached prefix is reused)")
    parser.add_argument("--prefix-cache-gb", type=_positive_float, metavar="GB",
                        help="the prefix cache's pool per device, in GB (default: half the memory left after the "
                             "parameters and the slots' KV cache)")
    parser.add_argument("--max-queue", type=_positive, default=1024,
                        help="requests that may wait for a slot; more are answered 429 (default: 1024)")
    add_runtime_arguments(parser)
    parser.set_defaults(run=_run_serve, decode_experts=False)

