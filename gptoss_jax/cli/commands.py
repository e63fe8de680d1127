"""The subcommands that need no chat: ``convert`` a checkpoint, ``generate`` a raw completion."""

from __future__ import annotations

import argparse
import sys
import warnings

from gptoss_jax.cli.arguments import (
    add_checkpoint_argument,
    add_runtime_arguments,
    add_sampling_arguments,
    check_generation_arguments,
    open_model_for,
)
from gptoss_jax.cli.generation import generate_streaming, report_throughput
from gptoss_jax.cli.terminal import PROG, checked_text, status, text_from_stdin

# Stops of a raw completion: the end of a document, and of a Harmony answer.
COMPLETION_STOP_TOKENS = ("<|endoftext|>", "<|return|>")


def _run_convert(args: argparse.Namespace) -> int:
    from gptoss_jax.checkpoints.hf_export import export_hf_checkpoint
    from gptoss_jax.checkpoints.orbax_writer import ConversionWarning, convert_checkpoint

    show_other_warning = warnings.showwarning

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        # The converter's warnings are for the user: one line, without Python's file and line.
        if issubclass(category, ConversionWarning):
            status(f"{PROG}: warning: {message}")
        else:
            show_other_warning(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning afterwards
        warnings.showwarning = show_warning
        write = export_hf_checkpoint if args.to == "hf" else convert_checkpoint
        destination = write(args.src, args.dst, progress=not args.no_progress, on_status=status)
    print(f"wrote {destination}")
    return 0


def add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a gpt-oss checkpoint into this project's format, or into OpenAI's published HF layout",
        description=(
            "Convert a gpt-oss safetensors checkpoint into this project's orbax checkpoint (--to orbax), "
            "or write a checkpoint in OpenAI's published Hugging Face MXFP4 layout (--to hf). "
            "SRC is either a Hugging Face root folder (config.json with model_type gpt_oss, "
            "model.safetensors or shards with model.safetensors.index.json) or OpenAI's "
            "original/ folder (config.json and model.safetensors); the layout is detected. "
            "In the Hugging Face layout the experts may be dense (bfloat16, float16 or float32: "
            "mlp.experts.gate_up_proj and down_proj, as fine-tuning recipes save them): they are "
            "quantized to MXFP4 by the OCP Microscaling rule, and one line says so. "
            "Every tensor name, shape and dtype is checked against config.json before any "
            "weight is read, tensors are streamed one at a time, and DST appears only once "
            "complete: on any error nothing is left behind. tokenizer.json is copied along "
            "from SRC (from its parent for an original/ folder, as gpt-oss's Hugging Face "
            "repositories keep it), with a warning when there is none. Load the result with gptoss_jax.load(DST); "
            "transformers and vLLM load a --to hf result too."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="the checkpoint folder to read: a safetensors folder (HF root or "
                                                   "original/), or with --to hf also a converted one")
    parser.add_argument("dst", metavar="DST", help="the folder to create (it must not exist; missing parent folders are made)")
    parser.add_argument(
        "--to", choices=("orbax", "hf"), default="orbax",
        help="orbax: this project's checkpoint, the fastest to load here. hf: OpenAI's published Hugging Face "
             "layout (MXFP4 _blocks and _scales, quantization_config mxfp4, 4 GB shards with "
             "model.safetensors.index.json); SRC may then also be a converted checkpoint (default: orbax)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar on stderr")
    parser.set_defaults(run=_run_convert)


def _run_generate(args: argparse.Namespace) -> int:
    import codecs

    prompt = checked_text(args.prompt, "prompt") if args.prompt is not None else text_from_stdin("prompt")
    check_generation_arguments(args)
    opened = open_model_for(args)
    model, tokenizer = opened.model, opened.tokenizer
    stops = [tokenizer.special_tokens[name] for name in COMPLETION_STOP_TOKENS if name in tokenizer.special_tokens]
    # Tokens can split a UTF-8 character; the incremental decoder holds the bytes until it is whole.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(token: int) -> None:
        if token not in stops:
            sys.stdout.write(utf8.decode(tokenizer.decode_bytes([token])))
            sys.stdout.flush()

    output, interrupted = generate_streaming(model, tokenizer.encode(prompt), args, stops, show)
    print(utf8.decode(b"", final=True))
    report_throughput(output.stats)
    if interrupted:
        raise KeyboardInterrupt
    return 0


def add_generate(subparsers: argparse._SubParsersAction) -> None:
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
    add_checkpoint_argument(parser)
    add_sampling_arguments(parser, max_new_tokens=128)
    add_runtime_arguments(parser)
    parser.set_defaults(run=_run_generate)
