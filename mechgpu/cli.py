"""The ``mechgpu`` command line.

    mechgpu demo    train a small model with every mechgpu optimizer beside its torch.optim twin
    mechgpu flow    push real data through a deep MLP and show, layer by layer, how activations
                    and gradients grow or vanish under different initialisations
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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

    flow = sub.add_parser("flow", help="push real data through a deep MLP and show each layer's "
                                       "activation and gradient statistics, as a table and a plot")
    flow.add_argument("--depth", type=int, default=30, help="hidden layers (default 30)")
    flow.add_argument("--width", type=int, default=256, help="units per hidden layer (default 256)")
    flow.add_argument("--activation", default="relu",
                      choices=["tanh", "sigmoid", "relu", "leaky_relu", "gelu", "silu", "selu", "linear"])
    flow.add_argument("--init", nargs="+", default=["xavier", "kaiming"],
                      choices=["auto", "xavier", "kaiming", "normal", "torch"],
                      help="one or more initialisations to compare (default: xavier kaiming)")
    flow.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    flow.add_argument("--batch", type=int, default=512, help="windows of text in the batch (default 512)")
    flow.add_argument("--plot", type=Path, default=Path("flow.png"),
                      help="PNG to write (default flow.png); 'none' for no plot")
    flow.add_argument("--device", choices=["cpu", "cuda"], default=None,
                      help="default: cuda when available, else cpu (kernels in triton's interpreter)")
    flow.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        device = _select_device(args.device)
        from .demo import run_demo

        return run_demo(steps=args.steps, batch=args.batch, device=device, seed=args.seed)
    if args.command == "flow":
        device = _select_device(args.device)
        from .flow import run_flow

        plot = None if str(args.plot) == "none" else args.plot
        run_flow(args.depth, args.width, args.activation, args.init, batch=args.batch, dtype=args.dtype,
                 device=device, seed=args.seed, plot=plot)
        return 0
    return 2
