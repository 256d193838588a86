"""The ``mechgpu`` command line; ``mechgpu <command> --help`` describes each command.

Values are checked as they are parsed (argparse ``type=``), so a bad one ends in a one-line
usage error and exit code 2 before anything runs. A value may start with a minus sign
(``--memory -5MiB`` is read as a value, then refused as a usage error). A few checks come after
parsing, still before anything runs: the checkpoint policy and the memory budget (sizes read by
``mechgpu._text.parse_bytes``), ``--heads`` dividing ``--dim``, a number of checkpoint segments
within ``--depth`` and ``--micro`` dividing ``--global-batch``, whose defaults depend on the
device. A budget that no configuration fits is known only once the model is measured, and is a
usage error too. ``--device cuda`` without a CUDA device is one line on stderr and exit code 2,
as in ``mechgpu check``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ._text import parse_bytes
from .testing.environment import cuda_problem

DEVICE_HELP = "default: cuda when available, else cpu with the kernels in triton's interpreter"
TOUR_DESCRIPTION = (
    "What mechgpu is for, in one run (python3 run.py runs it): the character GPT trained with mechgpu's AdamW "
    "(clipping fused into the step) and GELU, with gradient accumulation and a checkpoint plan for a memory "
    "budget halfway between checkpointing nothing and everything; beside a short run without checkpointing "
    "and the same run under torch.optim and torch's GELU. Ends with a table of saved activations (predicted "
    "and measured), step time, tokens/s and backend, and both loss trajectories with their largest difference.")
FIT_DESCRIPTION = (
    "Choose the micro-batch size, gradient accumulation steps and checkpoint plan that train the character GPT "
    "fastest within a memory budget, at a fixed global batch: measure the static memory (params, grads, "
    "optimizer state) and, for each micro-batch size, each block's saved activations and forward time and one "
    "forward and backward; predict each candidate's peak memory and tokens/s; train a few steps with the "
    "fastest that fits. Prints the candidates and the predicted against the measured peak and throughput, and "
    "writes fit.json.")


def _select_device(requested: str | None) -> str:
    """Pick the device, and on CPU turn on triton's interpreter before triton is imported."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("mechgpu: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    return device


# ---------------------------------------------------------------------- value checks
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """An int >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def accum_steps(text: str) -> int | str:
    """A positive int, or 'all'."""
    return "all" if text == "all" else positive_int(text)


def positive_float(text: str) -> float:
    """A finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def dropout(text: str) -> float:
    """A probability in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {text}")
    return value


def steps_to_confirm(text: str) -> int:
    """An int >= 2: a confirmation leaves its first step out of the throughput."""
    value = _int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (the first step is left out of the throughput), "
                                         f"not {value}")
    return value


def _signed_bytes(spec: str) -> int:
    """``parse_bytes`` with a minus sign allowed: ``"-5MiB"`` -> -5242880."""
    spec = spec.strip()
    return -parse_bytes(spec[1:]) if spec.startswith("-") else parse_bytes(spec)


def memory_problem(spec: str) -> str | None:
    """None when ``spec`` is a memory budget above 0 bytes, as ``parse_bytes`` reads it (2GiB, 300MB,
    65536), else why not."""
    try:
        budget = _signed_bytes(spec)
    except ValueError as error:
        return str(error)
    return None if budget > 0 else f"the memory budget must be positive, got {spec}"


def checkpoint_problem(spec: str) -> str | None:
    """None when ``mechgpu.train.checkpointing.make_plan`` accepts ``spec`` (none, all, sqrt, a
    number of segments >= 1, a memory budget above 0 read by ``parse_bytes``), else why not."""
    if spec in ("none", "all", "sqrt"):
        return None
    if re.fullmatch(r"-?\d+", spec):
        return None if int(spec) >= 1 else f"the number of segments must be at least 1, got {spec}"
    try:
        _signed_bytes(spec)
    except ValueError:
        return (f"{spec!r} is none of: none, all, sqrt, a number of segments, "
                "a memory budget such as 2GiB or 512MiB")
    return memory_problem(spec)


# ---------------------------------------------------------------------- the parser
def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the subcommands' parsers, by name."""
    from . import __version__
    from .testing import check as check_cli
    from .tools import bench as bench_cli

    parser = argparse.ArgumentParser(
        prog="mechgpu", description="Fused Triton kernels for the mechanics of training deep networks, as "
                                    "drop-in PyTorch pieces: demos, training, profiling, checks and benchmarks.")
    parser.add_argument("--version", action="version", version=f"mechgpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="<command>")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help, description=description)
        # Python 3.13's rule: an argument that starts with "-" and a digit ("-5MiB") is a value
        parser._negative_number_matcher = re.compile(r"-\.?\d")
        return parser

    demo = command("demo", "train a small model with each mechgpu optimizer beside its torch.optim twin",
                   "Train a small character-level MLP with each mechgpu optimizer, with some of its options, "
                   "beside its torch.optim twin on the same batches, and print both losses and the largest "
                   "parameter difference.")
    demo.add_argument("--steps", type=positive_int, default=40, help="optimizer steps per run (default %(default)s)")
    demo.add_argument("--batch", type=positive_int, default=64, help="sequences per batch (default %(default)s)")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the init (default %(default)s)")

    flow = command("flow", "show how activations and gradients grow or vanish through a deep MLP",
                   "Push one batch of real text through a deep MLP, once per initialisation, and print each "
                   "layer's activation and gradient statistics as a table, plus a plot overlaying the runs.")
    flow.add_argument("--depth", type=positive_int, default=30, help="hidden layers (default %(default)s)")
    flow.add_argument("--width", type=positive_int, default=256, help="units per hidden layer (default %(default)s)")
    flow.add_argument("--activation", default="relu",
                      choices=["tanh", "sigmoid", "relu", "leaky_relu", "gelu", "silu", "selu", "linear"],
                      help="the activation after each hidden layer (default %(default)s)")
    flow.add_argument("--init", nargs="+", default=["xavier", "kaiming"],
                      choices=["auto", "xavier", "kaiming", "normal", "torch"],
                      help="one or more initialisations to compare (default: xavier kaiming)")
    flow.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="dtype of the weights and activations (default %(default)s)")
    flow.add_argument("--batch", type=positive_int, default=512,
                      help="windows of text in the batch (default %(default)s)")
    flow.add_argument("--plot", type=Path, default=Path("flow.png"),
                      help="PNG to write, or 'none' for no plot (default %(default)s)")
    flow.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)
    flow.add_argument("--seed", type=int, default=0, help="seed of the batch and the init (default %(default)s)")

    tour = command("tour", "the main job: train a GPT with accumulation and a memory-budget checkpoint plan, "
                           "beside torch", TOUR_DESCRIPTION)
    _model_args(tour)
    tour.add_argument("--accum-steps", type=positive_int, default=None, metavar="N",
                      help="micro-batches per optimizer step (default 2)")
    tour.add_argument("--micro-batch", type=positive_int, default=None, metavar="N",
                      help="sequences per micro-batch (default 4 on CPU, 32 on CUDA)")
    tour.add_argument("--steps", type=positive_int, default=None,
                      help="optimizer steps of the planned and the torch runs (default 40 on CPU, 300 on CUDA)")
    tour.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = command("train", "train a character-level GPT with mechgpu's pieces and show what it costs",
                    "Train a small character-level GPT on the Python standard library's source with mechgpu's "
                    "AdamW (clipping fused into the step), GELU and init, with gradient accumulation and "
                    "checkpointing; print the loss, throughput, memory and saved activations.")
    _model_args(train)
    train.add_argument("--checkpoint", default="none", metavar="POLICY",
                       help="none | all | sqrt | N | a memory budget such as 2GiB (default %(default)s). N, at "
                            "most --depth: N segments of the blocks, each but the last recomputed in backward, "
                            "as with segments=N in torch.utils.checkpoint.checkpoint_sequential; sqrt: N is the "
                            "square root of --depth; all: every block recomputed; a budget bounds what forward "
                            "saves for backward")
    train.add_argument("--accum-steps", type=accum_steps, default=None, metavar="N|all",
                       help="micro-batches per optimizer step, or 'all' for full-batch descent over 8 "
                            "micro-batches (default 2)")
    train.add_argument("--micro-batch", type=positive_int, default=None, metavar="N",
                       help="sequences per micro-batch and rank (default 4 on CPU, 32 on CUDA)")
    train.add_argument("--steps", type=positive_int, default=None,
                       help="optimizer steps (default 30 on CPU, 300 on CUDA)")
    train.add_argument("--eval-every", type=non_negative_int, default=0, metavar="N",
                       help="evaluate on held-out text every N steps; 0 for never (default %(default)s)")
    train.add_argument("--log-dir", default=None, metavar="DIR",
                       help="write train_log.csv, train_log.jsonl, summary.json and the step-size plot "
                            "telemetry.png here (default: no log)")
    train.add_argument("--torch-baseline", action="store_true",
                       help="torch.optim.AdamW and torch.nn.GELU instead of mechgpu's")
    train.add_argument("--distributed", choices=["ddp", "fsdp"], default=None,
                       help="under torchrun: DDP or FSDP2 (gloo on CPU, nccl on CUDA; default: one process)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    profile = command("profile", "sweep checkpoint policy x accumulation x micro-batch beside a torch baseline",
                      "Train the character GPT for a few steps in every combination of checkpoint policy, "
                      "accumulation steps and micro-batch size, beside a torch baseline (torch.optim.AdamW, "
                      "torch.nn.GELU, no checkpointing); print a table and plot memory against throughput.")
    _model_args(profile)
    profile.add_argument("--policies", nargs="+", default=["none", "sqrt", "all"], metavar="POLICY",
                         help="checkpoint policies, each as train's --checkpoint (default: none sqrt all)")
    profile.add_argument("--accum", nargs="+", type=positive_int, default=[1, 2], metavar="N",
                         help="accumulation steps to try (default: 1 2)")
    profile.add_argument("--micro", nargs="+", type=positive_int, default=None, metavar="N",
                         help="micro-batch sizes to try (default: 4 on CPU, 16 32 on CUDA)")
    profile.add_argument("--steps", type=positive_int, default=None,
                         help="optimizer steps per run (default 3 on CPU, 20 on CUDA)")
    profile.add_argument("--no-baseline", action="store_true", help="leave out the torch baseline")
    profile.add_argument("--plot", type=Path, default=Path("profile.png"),
                         help="PNG to write (its data beside it as .json), or 'none' for neither "
                              "(default %(default)s)")
    profile.add_argument("--no-progress", action="store_true", help="no progress bar")

    fit = command("fit", "choose the fastest micro-batch x accumulation x checkpoint plan within a memory budget",
                  FIT_DESCRIPTION)
    _model_args(fit, lr=False)
    fit.add_argument("--memory", required=True, metavar="BUDGET",
                     help="the peak memory to stay within, such as 2GiB or 300MB: on CUDA as "
                          "torch.cuda.max_memory_allocated counts it, on CPU params, grads, optimizer state and "
                          "saved activations (required)")
    fit.add_argument("--global-batch", type=positive_int, default=None, metavar="N",
                     help="sequences per optimizer step, micro-batch x accumulation steps (default 8 on CPU, "
                          "64 on CUDA)")
    fit.add_argument("--micro", nargs="+", type=positive_int, default=None, metavar="N",
                     help="micro-batch sizes to consider, each dividing --global-batch (default: all its divisors)")
    fit.add_argument("--steps", type=steps_to_confirm, default=3,
                     help="steps of the confirmation run with the chosen configuration, the first left out of "
                          "its throughput (default %(default)s)")
    fit.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                     help="write fit.json into this folder (default %(default)s)")

    check = command("check", "run every kernel against PyTorch's own implementation on this device",
                    "Run every kernel against PyTorch's own implementation on this device (CUDA, or the CPU "
                    "with the kernels in triton's interpreter) on fresh random inputs, and print a table of "
                    "errors. Exits 1 on any failure, 2 when the checks cannot run.")
    check_cli.add_arguments(check)
    bench = command("bench", "run the benchmark suite, or regenerate the README's results section",
                    "Run the benchmark scripts in bench/ (a source checkout) and write "
                    "bench/results/<device>.json, .md and plots; with --readme, only regenerate the README's "
                    "results section from the committed results.")
    bench_cli.add_arguments(bench)
    return parser, {"demo": demo, "flow": flow, "tour": tour, "train": train, "profile": profile, "fit": fit,
                    "check": check, "bench": bench}


def _model_args(p: argparse.ArgumentParser, lr: bool = True) -> None:
    """The character GPT's flags; ``lr=False`` leaves out --lr (for a command whose choice it cannot change)."""
    p.add_argument("--dim", type=positive_int, default=None, help="model width (default 32 on CPU, 384 on CUDA)")
    p.add_argument("--depth", type=positive_int, default=None,
                   help="transformer blocks (default 4 on CPU, 12 on CUDA)")
    p.add_argument("--heads", type=positive_int, default=None,
                   help="attention heads; must divide --dim (default 4 on CPU, 6 on CUDA)")
    p.add_argument("--context", type=positive_int, default=None,
                   help="characters per sequence (default 32 on CPU, 256 on CUDA)")
    if lr:
        p.add_argument("--lr", type=positive_float, default=None,
                       help="peak learning rate of the warm-up and cosine schedule (default 0.01 on CPU, 0.001 on "
                            "CUDA)")
    p.add_argument("--dropout", type=dropout, default=0.1, help="dropout probability (default %(default)s)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and loss")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the init, the data order and dropout "
                                                       "(default %(default)s)")


# ---------------------------------------------------------------------- running
def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)

    if args.command == "check":
        from .testing import check as check_cli

        return check_cli.run(args, select_device=_select_device)
    if args.command == "bench":
        from .tools import bench as bench_cli

        return bench_cli.run(args)
    if problem := cuda_problem(args.device):
        print(f"mechgpu {args.command}: {problem}", file=sys.stderr)
        return 2
    device = _select_device(args.device)
    if args.command == "demo":
        from .tools.demo import run_demo

        return run_demo(steps=args.steps, batch=args.batch, device=device, seed=args.seed)
    if args.command == "flow":
        from .tools.flow import run_flow

        plot = None if str(args.plot) == "none" else args.plot
        run_flow(args.depth, args.width, args.activation, args.init, batch=args.batch, dtype=args.dtype,
                 device=device, seed=args.seed, plot=plot)
        return 0

    this = commands[args.command]  # tour, train, profile or fit
    policies = {"train": [getattr(args, "checkpoint", None)], "profile": getattr(args, "policies", None)}.get(
        args.command) or []
    flag = "--checkpoint" if args.command == "train" else "--policies"
    for spec in policies:
        if problem := checkpoint_problem(spec):
            this.error(f"argument {flag}: {problem}")
    if args.command == "fit" and (problem := memory_problem(args.memory)):
        this.error(f"argument --memory: {problem}")
    from .tools.jobs import TrainConfig, run_profile, run_train
    from .tools.tour import TOUR_STEPS, run_tour

    cfg = TrainConfig(device=device, dim=args.dim, depth=args.depth, heads=args.heads, context=args.context,
                      lr=getattr(args, "lr", None), dropout=args.dropout, bf16=args.bf16, seed=args.seed,
                      progress=not getattr(args, "no_progress", False))
    if args.command == "tour":
        cfg.accum_steps, cfg.micro_batch = args.accum_steps, args.micro_batch
        cfg.steps = args.steps or TOUR_STEPS[device]
    elif args.command == "train":
        cfg.checkpoint, cfg.accum_steps, cfg.micro_batch = args.checkpoint, args.accum_steps, args.micro_batch
        cfg.steps, cfg.eval_every, cfg.log_dir = args.steps, args.eval_every, args.log_dir
        cfg.torch_baseline, cfg.distributed = args.torch_baseline, args.distributed
    elif args.command == "profile":
        cfg.steps = args.steps or (3 if device == "cpu" else 20)
    cfg.resolve()
    if cfg.dim % cfg.heads:
        this.error(f"argument --heads: {cfg.heads} heads do not divide the width --dim {cfg.dim}")
    for spec in policies:
        if spec.isdigit() and int(spec) > cfg.depth:
            this.error(f"argument {flag}: {spec} segments, but the model has {cfg.depth} blocks (--depth), so "
                       f"at most {cfg.depth} segments")
    if args.command == "tour":
        run_tour(cfg)
        return 0
    if args.command == "fit":
        return _fit(args, cfg, this)
    if args.command == "train":
        from .train.checkpointing import BudgetTooSmall

        try:
            run_train(cfg)
        except BudgetTooSmall as error:  # known only once the blocks are measured
            this.error(f"argument --checkpoint: {error}")
        return 0
    micros = args.micro or ([4] if device == "cpu" else [16, 32])
    plot = None if str(args.plot) == "none" else args.plot
    run_profile(cfg, args.policies, args.accum, micros, plot, baseline=not args.no_baseline)
    return 0


def _fit(args: argparse.Namespace, cfg, this: argparse.ArgumentParser) -> int:
    """``mechgpu fit`` once ``cfg`` is resolved: the global batch defaults to train's micro-batch x
    accumulation steps; a budget no configuration fits is a usage error."""
    from .tools.jobs import run_fit
    from .train.checkpointing import BudgetTooSmall

    global_batch = args.global_batch or cfg.micro_batch * cfg.accum_steps
    if wrong := [m for m in args.micro or () if global_batch % m]:
        this.error(f"argument --micro: the global batch {global_batch} is not a multiple of "
                   f"{', '.join(map(str, wrong))}")
    try:
        run_fit(cfg, args.memory, global_batch, args.micro, args.steps, args.out)
    except BudgetTooSmall as error:  # known only once the model is measured
        this.error(f"argument --memory: {error}")
    return 0
