"""The ``mechgpu`` command line.

    mechgpu demo    train a small model with every mechgpu optimizer beside its torch.optim twin
"""

from __future__ import annotations

import argparse
import os
import sys


def _select_device(requested: str | None) -> str:
    """Pick the device, and on CPU turn on triton's interpreter before triton is imported."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("mechgpu: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mechgpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small character model with each mechgpu optimizer "
                                       "beside its torch.optim twin and compare")
    demo.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    demo.add_argument("--batch", type=int, default=64, help="sequences per batch (default 64)")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None,
                      help="default: cuda when available, else cpu (kernels in triton's interpreter)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        device = _select_device(args.device)
        from .demo import run_demo

        return run_demo(steps=args.steps, batch=args.batch, device=device, seed=args.seed)
    return 2
