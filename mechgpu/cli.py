"""The ``mechgpu`` command line.

    mechgpu demo    train a small model with every mechgpu optimizer beside its torch.optim twin
    mechgpu flow    push real data through a deep MLP and show, layer by layer, how activations
                    and gradients grow or vanish under different initialisations
    mechgpu train   train a small character-level GPT on stdlib source with mechgpu's optimizer,
                    activations and init; gradient accumulation and checkpointing; prints loss,
                    throughput, peak memory and saved activations
    mechgpu profile sweep checkpoint policy x accumulation steps x micro-batch beside a torch
                    baseline: a table and a plot of memory against throughput
    mechgpu check   run every kernel against PyTorch's own implementation on this device and
                    print a table of errors; exits non-zero on any failure
    mechgpu bench   run the benchmark suite in bench/, write bench/results/<device>.json and .md
                    and the plots; --readme regenerates the README's results from committed results
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

    train = sub.add_parser("train", help="train a character-level GPT with mechgpu's pieces and show what "
                                         "checkpointing and accumulation cost")
    _model_args(train)
    train.add_argument("--checkpoint", default="none",
                       help="none | all | sqrt | N segments | a memory budget such as 2GiB (default none)")
    train.add_argument("--accum-steps", default=None,
                       help="micro-batches per optimizer step, or 'all' (full-batch GD over 8 micro-batches)")
    train.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch and rank")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps")
    train.add_argument("--eval-every", type=int, default=0, help="evaluate on held-out text every N steps")
    train.add_argument("--log-dir", default=None, help="write train_log.csv, train_log.jsonl, summary.json here")
    train.add_argument("--torch-baseline", action="store_true",
                       help="torch.optim.AdamW and torch.nn.GELU instead of mechgpu's")
    train.add_argument("--distributed", choices=["ddp", "fsdp"], default=None,
                       help="under torchrun: DDP or FSDP2 (gloo on CPU, nccl on CUDA)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    profile = sub.add_parser("profile", help="sweep checkpoint policy x accumulation x micro-batch beside a "
                                             "torch baseline; table and PNG of memory against throughput")
    _model_args(profile)
    profile.add_argument("--policies", nargs="+", default=["none", "sqrt", "all"])
    profile.add_argument("--accum", nargs="+", type=int, default=[1, 2])
    profile.add_argument("--micro", nargs="+", type=int, default=None, help="micro-batch sizes")
    profile.add_argument("--steps", type=int, default=None, help="steps per run (default 3 on CPU, 20 on CUDA)")
    profile.add_argument("--no-baseline", action="store_true", help="leave out the torch baseline")
    profile.add_argument("--plot", type=Path, default=Path("profile.png"), help="PNG to write; 'none' for none")

    check = sub.add_parser("check", help="run every kernel against PyTorch's own implementation on this "
                                         "device; a table of errors, non-zero exit on any failure")
    bench = sub.add_parser("bench", help="run the benchmark suite and write bench/results/<device>.json, "
                                         ".md and plots; or regenerate the README's results section")
    from .tools import bench as bench_cli
    from .tools import check as check_cli

    check_cli.add_arguments(check)
    bench_cli.add_arguments(bench)
    args = parser.parse_args(argv)

    if args.command == "check":
        return check_cli.run(args, select_device=_select_device)
    if args.command == "bench":
        return bench_cli.run(args)
    if args.command == "demo":
        device = _select_device(args.device)
        from .tools.demo import run_demo

        return run_demo(steps=args.steps, batch=args.batch, device=device, seed=args.seed)
    if args.command == "flow":
        device = _select_device(args.device)
        from .tools.flow import run_flow

        plot = None if str(args.plot) == "none" else args.plot
        run_flow(args.depth, args.width, args.activation, args.init, batch=args.batch, dtype=args.dtype,
                 device=device, seed=args.seed, plot=plot)
        return 0
    if args.command in ("train", "profile"):
        device = _select_device(args.device)
        from .tools.jobs import TrainConfig, run_profile, run_train

        cfg = TrainConfig(device=device, dim=args.dim, depth=args.depth, heads=args.heads, context=args.context,
                          lr=args.lr, dropout=args.dropout, bf16=args.bf16, seed=args.seed)
        if args.command == "train":
            cfg.checkpoint, cfg.accum_steps, cfg.micro_batch = args.checkpoint, args.accum_steps, args.micro_batch
            cfg.steps, cfg.eval_every, cfg.log_dir = args.steps, args.eval_every, args.log_dir
            cfg.torch_baseline, cfg.distributed = args.torch_baseline, args.distributed
            cfg.progress = not args.no_progress
            run_train(cfg)
            return 0
        cfg.steps = args.steps or (3 if device == "cpu" else 20)
        micros = args.micro or ([4] if device == "cpu" else [16, 32])
        plot = None if str(args.plot) == "none" else args.plot
        run_profile(cfg, args.policies, args.accum, micros, plot, baseline=not args.no_baseline)
        return 0
    return 2


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, default=None, help="model width (default 32 on CPU, 384 on CUDA)")
    p.add_argument("--depth", type=int, default=None, help="transformer blocks (default 4 on CPU, 12 on CUDA)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--context", type=int, default=None, help="characters per sequence")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and loss")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu (kernels in triton's interpreter)")
    p.add_argument("--seed", type=int, default=0)
