"""Arguments that several subcommands share, and handing them to the library.

Each ``add_*_arguments(parser)`` declares a group of flags; :func:`open_model_for` opens the
model that ``--checkpoint`` and the runtime flags name, through :func:`gptoss_jax.opening.open_model`,
whose messages then name these flags.
"""

from __future__ import annotations

import argparse
import datetime
from typing import TYPE_CHECKING

from gptoss_jax.cli.terminal import InputError, status
from gptoss_jax.opening import DTYPES

if TYPE_CHECKING:
    from gptoss_jax.opening import OpenedModel

# jax.random.key keeps a seed's low 32 bits, so larger seeds would repeat smaller ones.
SEED_LIMIT = 2**32


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", metavar="DIR",
        help="checkpoint folder: converted, HF root or original/ (its tokenizer.json in the folder, "
             "or for original/ in its parent) (default: the embedded demo model, made on the spot)",
    )


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="compute dtype (default: bfloat16)")
    parser.add_argument(
        "--kernels", choices=("auto", "pallas", "xla"), default="auto",
        help="pallas: the Pallas Mosaic-GPU kernels for attention and the MXFP4 experts wherever the "
             "model's shapes fit them (gpt-oss's always do; the status line says which run), the plain-XLA "
             "reference elsewhere; on an NVIDIA Hopper GPU (sm_90) all of them, on Ampere, Ada and Blackwell "
             "GPUs (sm_80, sm_86, sm_89, sm_100, sm_120) the expert kernel (mma.sync), attention on XLA. xla: "
             "the XLA reference everywhere. auto: pallas on those GPUs, else xla; the GPTOSS_JAX_KERNELS "
             "environment variable overrides auto (default: auto)")
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


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int, turns: bool = False) -> None:
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


def add_harmony_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium",
                        help="the system message's reasoning effort (default: medium)")
    parser.add_argument("--developer", "--system", dest="developer", metavar="TEXT",
                        help="instructions (what other chat formats call the system prompt), "
                             "sent as Harmony's developer message")
    parser.add_argument("--date", metavar="YYYY-MM-DD", default=datetime.date.today().isoformat(),
                        help="the system message's current date (default: today)")


def check_generation_arguments(args: argparse.Namespace) -> None:
    """Reject bad sampling arguments before any model is loaded."""
    from gptoss_jax.sampling import SamplingConfig

    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise InputError(f"--{str(e).replace('_', '-')}") from None


def option_flag(name: str, value: object = None) -> str:
    """How the library's messages name its options here: ``decode_experts`` -> ``--decode-experts``,
    ``kernels`` set to ``xla`` -> ``--kernels xla`` (see :data:`gptoss_jax.opening.OptionName`)."""
    flag = "--" + name.replace("_", "-")
    return flag if value is None else f"{flag} {value}"


def open_model_for(args: argparse.Namespace) -> OpenedModel:
    """The model and tokenizer of ``--checkpoint``, or of the embedded demo checkpoint, opened with
    the runtime arguments; status lines go to stderr, and the loading progress bar on a terminal."""
    from gptoss_jax.opening import open_model

    return open_model(
        args.checkpoint, dtype=args.dtype, kernels=args.kernels, mesh=args.mesh, decode_experts=args.decode_experts,
        progress=True, on_status=status, option_name=option_flag,
    )
