"""``gptoss-jax env``: what this machine offers gpt-oss, on one screen or as JSON for a bug report
(:mod:`gptoss_jax.environment` gathers it; nothing is compiled and no weights are read)."""

from __future__ import annotations

import argparse
import json

from gptoss_jax.cli.arguments import option_flag


def _run_env(args: argparse.Namespace) -> int:
    from gptoss_jax.environment import describe_environment, gather_environment

    report = gather_environment(args.checkpoint, args.mesh, option_name=option_flag, check_kernels=args.check_kernels)
    print(json.dumps(report, indent=2) if args.json else describe_environment(report))
    return 0


def add_env(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "env",
        help="show the versions, devices, CUDA and which kernels run here (for bug reports: --json)",
        description=(
            "Show Python's and the packages' versions, the JAX backend and its devices with their "
            "memory, the CUDA runtime and driver and the ptxas Mosaic GPU compiles with, whether each "
            "Pallas kernel (MoE experts, prefill attention, decode attention) runs here and if not why "
            "(the model's own decision, under --kernels auto), and JAX's compilation cache folder. "
            "With --checkpoint, also its model, its parameters per device against the free memory, and "
            "the longest context that fits at batch 1, from config.json alone. Fast: nothing is "
            "compiled and no weights are read, unless --check-kernels runs the kernels' first-use check."
        ),
    )
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="a checkpoint folder to size against the devices (only its config.json is read)")
    parser.add_argument("--mesh", metavar="SPEC",
                        help="the mesh for the checkpoint's per-device figures, e.g. expert=2,tensor=4 "
                             "(default: the one the other commands pick)")
    parser.add_argument("--check-kernels", action="store_true",
                        help="on a Hopper GPU, run each kernel the model would use once at its real shapes against "
                             "its XLA reference (a minute or two), keep the verdicts and print them; a kernel that "
                             "fails runs on XLA from then on (GPTOSS_JAX_KERNEL_CHECK=0 turns the check off)")
    parser.add_argument("--json", action="store_true",
                        help="print everything as JSON, jax.print_environment_info() (and nvidia-smi) included")
    parser.set_defaults(run=_run_env)
