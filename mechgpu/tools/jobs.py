"""``mechgpu train``, ``mechgpu profile`` and ``mechgpu fit``: the character GPT on stdlib source.

``build_model`` and ``build_optimizer`` make the model and optimizer that every job trains;
``run_train`` trains one configuration and prints what it cost; ``run_profile`` sweeps
checkpoint policy x accumulation steps x micro-batch size beside a torch baseline
(``torch.optim.AdamW``, ``torch.nn.GELU``, no checkpointing) and writes a table and a plot;
``run_fit`` finds the fastest configuration within a memory budget (``mechgpu.train.fit``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._text import format_bytes, parse_bytes
from ..train.fit import FitResult, fit
from ..train.trainer import Trainer
from .gpt import CharBatches, CharCorpus, CharGPT, TokenLoss, init_gpt

#: the defaults, by device: a CPU run goes through triton's interpreter (~10 us per element of
#: an activation, ~2.5 us per parameter of an Adam step), so it is kept small.
DEFAULTS = {
    "cpu": dict(dim=32, depth=4, heads=4, context=32, micro_batch=4, accum_steps=2, steps=30, lr=1e-2),
    "cuda": dict(dim=384, depth=12, heads=6, context=256, micro_batch=32, accum_steps=2, steps=300, lr=1e-3),
}


@dataclass
class TrainConfig:
    device: str = "cpu"
    dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    context: int | None = None
    micro_batch: int | None = None
    accum_steps: int | str | None = None
    steps: int | None = None
    lr: float | None = None
    checkpoint: str = "none"
    dropout: float = 0.1
    bf16: bool = False
    max_grad_norm: float = 1.0
    eval_every: int = 0
    seed: int = 0
    torch_baseline: bool = False
    log_dir: str | None = None
    progress: bool = True
    distributed: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> TrainConfig:
        defaults = DEFAULTS["cuda" if self.device == "cuda" else "cpu"]
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if isinstance(self.accum_steps, str) and self.accum_steps.isdigit():
            self.accum_steps = int(self.accum_steps)
        return self


def _lr_schedule(optimizer, steps: int):
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _setup_distributed(kind: str | None, device: str) -> tuple[int, int, str]:
    if kind is None:
        return 0, 1, device
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


def _wrap(model: torch.nn.Module, kind: str | None, device: str) -> torch.nn.Module:
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[torch.device(device).index] if "cuda" in device else None)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def build_model(cfg: TrainConfig, vocab: int, device: str) -> torch.nn.Module:
    """The character GPT of ``cfg`` (resolved): seeded, initialised by ``init_gpt``, on ``device``,
    wrapped for ``cfg.distributed``."""
    torch.manual_seed(cfg.seed)
    model = CharGPT(vocab, cfg.context, cfg.dim, cfg.depth, cfg.heads, cfg.dropout,
                    torch_baseline=cfg.torch_baseline).to(device)
    init_gpt(model, cfg.seed)
    return _wrap(model, cfg.distributed, device)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with betas (0.9, 0.95), weight decay 0.1 on the matrices and none on the vectors:
    torch's with ``cfg.torch_baseline`` (the Trainer then clips), else mechgpu's with clipping
    to ``cfg.max_grad_norm`` fused into the step and step-size telemetry summed in the kernel."""
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.torch_baseline:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    from ..optim import AdamW

    return AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), max_grad_norm=cfg.max_grad_norm, telemetry=True)


def build(cfg: TrainConfig, corpus: CharCorpus | None = None, rank: int = 0, world: int = 1,
          device: str | None = None):
    """(trainer, train data, corpus) for one configuration."""
    device = device or cfg.device
    corpus = corpus or CharCorpus()
    model = build_model(cfg, corpus.vocab, device)
    optimizer = build_optimizer(cfg, model)
    data = CharBatches(corpus.train, cfg.micro_batch, cfg.context, batches=10**9 if cfg.accum_steps != "all" else 8,
                       seed=cfg.seed, device=device, rank=rank, world=world)
    eval_data = list(CharBatches(corpus.val, cfg.micro_batch, cfg.context, batches=4, seed=cfg.seed + 1,
                                 device=device, rank=rank, world=world)) if cfg.eval_every else None
    trainer = Trainer(model, TokenLoss(), optimizer, scheduler=_lr_schedule(optimizer, cfg.steps),
                      accum_steps=cfg.accum_steps, checkpoint=cfg.checkpoint, blocks="blocks",
                      max_grad_norm=cfg.max_grad_norm, autocast="bf16" if cfg.bf16 else None, eval_data=eval_data,
                      eval_every=cfg.eval_every, log_every=max(1, cfg.steps // 20), log_dir=cfg.log_dir,
                      progress=cfg.progress and rank == 0, predict=True)
    return trainer, data, corpus


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    cfg.resolve()
    rank, world, device = _setup_distributed(cfg.distributed, cfg.device)
    trainer, data, corpus = build(cfg, rank=rank, world=world, device=device)
    n_params = sum(p.numel() for p in trainer.params)
    if rank == 0:
        mode = "CUDA" if device.startswith("cuda") else "CPU, mechgpu kernels in triton's interpreter"
        print(f"mechgpu train: character GPT on {len(corpus.train) + len(corpus.val):,} characters of stdlib "
              f"source (vocab {corpus.vocab}); {cfg.depth} blocks of width {cfg.dim}, context {cfg.context}, "
              f"{n_params:,} params\ndevice: {mode}; world size {world}; {cfg.steps} steps of "
              f"{cfg.accum_steps} x {cfg.micro_batch * world} sequences "
              f"({'torch baseline' if cfg.torch_baseline else 'mechgpu AdamW (fused clip), mechgpu GELU'})")
    start = time.perf_counter()
    summary = trainer.fit(data, cfg.steps)
    summary["wall_s"] = time.perf_counter() - start
    summary["world_size"] = world
    summary["losses"] = [r["loss"] for r in trainer.history]
    if rank == 0:
        print_summary(summary, trainer)
    if cfg.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return summary


def print_summary(s: dict[str, Any], trainer: Trainer) -> None:
    h = trainer.history
    print(f"\n{s['checkpoint']}")
    points = sorted({0, len(h) // 4, len(h) // 2, 3 * len(h) // 4, len(h) - 1})
    print("step  " + "  ".join(f"{h[i]['step']:>7}" for i in points))
    print("loss  " + "  ".join(f"{h[i]['loss']:>7.4f}" for i in points))
    print(f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}"
          + (f"; eval loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else ""))
    if s["items_per_s"]:
        print(f"throughput {s['items_per_s']:,.0f} tokens/s, {s['samples_per_s']:,.1f} samples/s, "
              f"{1e3 * s['step_s']:.1f} ms/step (first {trainer.warmup_steps} step(s) excluded)")
    saved = s["saved_activation_bytes"]
    pred = s["predicted_saved_activation_bytes"]
    line = f"saved activations (one micro-batch, measured) {format_bytes(saved or 0)}"
    if pred is not None:
        peak = format_bytes(s["predicted_backward_peak_bytes"])
        line += f"; predicted {format_bytes(pred)}, backward peak predicted {peak}"
    print(line)
    mem = (f"params {format_bytes(s['params_bytes'])}, grads {format_bytes(s['grads_bytes'])}, "
           f"optimizer state {format_bytes(s['optimizer_state_bytes'])}")
    if "peak_bytes" in s:
        print(f"peak memory {format_bytes(s['peak_bytes'])}: {mem}, activations and other "
              f"{format_bytes(s['activations_and_other_bytes'])}")
    else:
        print(f"memory: {mem} (peak allocation is measured on CUDA only)")
    if "update_ratio" in h[-1]:
        line = (f"step size ||dp||/||p|| {h[0]['update_ratio']:.2e} -> {h[-1]['update_ratio']:.2e}; "
                f"non-finite grads {sum(int(r['nonfinite_grads']) for r in h)}")
        if _can_lose_updates(trainer):
            line += (f"; updates lost to {trainer.params[0].dtype} rounding "
                     f"{100 * h[-1]['lost_update_fraction']:.1f}% (last step)")
        print(line)
    if trainer.log_dir is not None:
        files = [trainer.log_dir / name for name in ("train_log.csv", "train_log.jsonl", "summary.json")]
        if "update_ratio" in h[-1]:
            files.append(plot_telemetry(trainer, trainer.log_dir / "telemetry.png"))
        print(f"log: {', '.join(map(str, files))}")


def _can_lose_updates(trainer: Trainer) -> bool:
    """Whether the optimizer's lost-update fraction can be non-zero (bf16/fp16 params without masters)."""
    return bool(getattr(trainer.optimizer, "can_lose_updates", False))


def telemetry_figure(trainer: Trainer):
    """Whether the step size is healthy, from ``trainer.history`` (a mechgpu optimizer made with
    ``telemetry=True``), one panel each, over integer steps: the loss (and eval loss); the step size
    ||dp||/||p|| on a log axis (a skipped step, 0, leaves a gap); the non-finite grad elements; and,
    only where the optimizer ``can_lose_updates``, the % of changed elements whose update was lost
    to rounding. Returns the matplotlib Figure (Agg), for the caller to save and close."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    h = trainer.history
    steps = [r["step"] for r in h]
    lossy = _can_lose_updates(trainer)
    panels = 4 if lossy else 3
    heights = (3, 3, 1.5, 2.5)[:panels]  # the counts are mostly 0: a short panel
    fig, axes = plt.subplots(panels, 1, figsize=(6.4, 0.75 * sum(heights) + 0.9), sharex=True,
                             gridspec_kw={"height_ratios": heights})
    loss, ratio, nonfinite = axes[:3]
    loss.plot(steps, [r["loss"] for r in h], label="train")
    evals = [(r["step"], r["eval_loss"]) for r in h if "eval_loss" in r]
    if evals:
        loss.plot(*zip(*evals), "o-", label="eval")
        loss.legend(fontsize=8)
    loss.set_title("loss", fontsize=9)
    ratio.semilogy(steps, [r["update_ratio"] if r["update_ratio"] > 0 else math.nan for r in h])
    ratio.set_title("step size ||dp|| / ||p|| (log)", fontsize=9)
    counts = [int(r["nonfinite_grads"]) for r in h]
    nonfinite.bar(steps, counts, width=0.8, color="tab:red")
    nonfinite.set_title(f"non-finite grad elements ({sum(counts):,} in all)", fontsize=9)
    nonfinite.yaxis.set_major_locator(MaxNLocator(integer=True))
    _from_zero(nonfinite, top=1)
    if not any(counts):
        nonfinite.text(0.5, 0.5, "no inf or NaN grads", transform=nonfinite.transAxes, ha="center", va="center",
                       fontsize=8, color="gray")
    if lossy:
        lost = axes[3]
        lost.plot(steps, [100 * r["lost_update_fraction"] for r in h], color="tab:purple")
        lost.set_title("updates lost to rounding (% of changed elements)", fontsize=9)
        _from_zero(lost, top=1)
    loss.set_ylim(bottom=max(0.0, loss.get_ylim()[0]))  # autoscale's margin may dip below 0
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(which="both", labelsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle("step-size telemetry, summed inside mechgpu's update kernel", fontsize=10)
    fig.tight_layout()
    return fig


def _from_zero(ax, top: float = 0.0) -> None:
    """A non-negative quantity's axis: from 0 (never below), up to at least ``top``."""
    ax.set_ylim(0, max(ax.get_ylim()[1], top))


def plot_telemetry(trainer: Trainer, out: Path) -> Path:
    """``telemetry_figure`` of ``trainer``, saved to ``out``."""
    import matplotlib.pyplot as plt

    fig = telemetry_figure(trainer)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------ fit
def run_fit(cfg: TrainConfig, memory: str, global_batch: int, micro_batches: list[int] | None, steps: int,
            out: Path) -> FitResult:
    """``mechgpu fit``: ``mechgpu.train.fit`` on the model and optimizer of ``mechgpu train``
    (``cfg``, resolved), printing the report and writing ``out/fit.json``."""
    corpus = CharCorpus()
    model = build_model(cfg, corpus.vocab, cfg.device)
    draws = itertools.count()

    def sample_batch(micro: int):
        batches = CharBatches(corpus.train, micro, cfg.context, batches=1, seed=cfg.seed, device=cfg.device)
        batches.set_epoch(next(draws))  # a fresh draw each call
        return next(iter(batches))

    print(f"mechgpu fit: the character GPT ({cfg.depth} blocks of width {cfg.dim}, context {cfg.context}) with a "
          f"global batch of {global_batch} sequences in {format_bytes(parse_bytes(memory))}: probing each "
          f"micro-batch size, then {steps} steps with the fastest configuration that fits\n")
    result = fit(model, TokenLoss(), lambda m: build_optimizer(cfg, m), sample_batch, memory=memory,
                 global_batch=global_batch, micro_batches=micro_batches, steps=steps, blocks="blocks",
                 max_grad_norm=cfg.max_grad_norm, autocast="bf16" if cfg.bf16 else None)
    print(result.report())
    print(f"\nwrote {result.write(out)}")
    return result


# -------------------------------------------------------------------------------- profile
def run_profile(base: TrainConfig, policies: list[str], accums: list[int], micros: list[int],
                out: Path | None, baseline: bool = True) -> list[dict[str, Any]]:
    """Train ``base`` for ``base.steps`` steps in every combination of checkpoint policy,
    accumulation steps and micro-batch size (and the torch baseline for each of the last two),
    printing a row per run; with ``out``, write the rows to ``out``'s .json and plot them to ``out``.
    A tqdm bar shows the sweep when ``base.progress`` and stderr is a terminal."""
    from tqdm import tqdm

    base.resolve()
    corpus = CharCorpus()
    configs = [(p, False) for p in policies] + ([("none", True)] if baseline else [])
    sweep = [(micro, accum, policy, torch_baseline)
             for micro in micros for accum in accums for policy, torch_baseline in configs]
    bar = tqdm(sweep, desc="profile", unit="run", dynamic_ncols=True, leave=False,
               disable=None if base.progress else True)
    runs = []
    for micro, accum, policy, torch_baseline in bar:
        cfg = TrainConfig(**{**base.__dict__, "checkpoint": policy, "accum_steps": accum, "micro_batch": micro,
                             "torch_baseline": torch_baseline, "progress": False, "log_dir": None})
        row = {"implementation": "torch" if torch_baseline else "mechgpu", "checkpoint": policy, "accum": accum,
               "micro_batch": micro, "backend": _backend(cfg.device, torch_baseline)}
        bar.set_postfix_str(f"{_series(row)} {_shape(row)}")
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
        trainer, data, _ = build(cfg, corpus)
        s = trainer.fit(data, cfg.steps)
        row.update(peak_bytes=s.get("peak_bytes"), saved_bytes=s["saved_activation_bytes"],
                   predicted_saved_bytes=s["predicted_saved_activation_bytes"], tokens_per_s=s["items_per_s"],
                   step_s=s["step_s"], final_loss=s["final_loss"])
        if not runs:
            bar.write(_legend(trainer.warmup_steps) + "\n" + _header())
        runs.append(row)
        bar.write(_row(row))
        del trainer, data
    bar.close()
    if caveat := _backend_caveat(runs):
        print(caveat)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"device": _device_name(base.device), "runs": runs}, indent=2))
        _plot(runs, out, base.device)
        print(f"\nwrote {out} and {out.with_suffix('.json')}")
    return runs


def _series(r: dict) -> str:
    """The implementation and checkpoint policy of a run (a colour in the plot): ``mechgpu sqrt``."""
    return f"{r['implementation']} {r['checkpoint']}"


def _shape(r: dict) -> str:
    """Its accumulation steps and micro-batch size (a marker in the plot): ``a2 m4``."""
    return f"a{r['accum']} m{r['micro_batch']}"


def _legend(warmup_steps: int) -> str:
    first = "first step" if warmup_steps == 1 else f"first {warmup_steps} steps"
    return ("legend: a = accum = micro-batches per optimizer step, m = micro = sequences per micro-batch (a2 m4: "
            "2 x 4 sequences a step); saved act = what one micro-batch's forward keeps for backward, measured, and "
            f"predicted = the checkpoint planner's estimate of it; peak mem is measured on CUDA only; tokens/s and "
            f"ms/step leave out the {first}")


def _header() -> str:
    return (f"{'impl':<8} {'checkpoint':<10} {'accum':>5} {'micro':>5} {'peak mem':>11} {'saved act':>11} "
            f"{'predicted':>11} {'tokens/s':>10} {'ms/step':>9} {'loss':>7}  backend\n" + "-" * 124)


def _row(r: dict) -> str:
    size = lambda b: format_bytes(b) if b is not None else "n/a"
    tokens = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "n/a"
    ms = f"{1e3 * r['step_s']:.1f}" if r["step_s"] is not None else "n/a"
    return (f"{r['implementation']:<8} {r['checkpoint']:<10} {r['accum']:>5} {r['micro_batch']:>5} "
            f"{size(r['peak_bytes']):>11} {size(r['saved_bytes']):>11} {size(r['predicted_saved_bytes']):>11} "
            f"{tokens:>10} {ms:>9} {r['final_loss']:>7.4f}  {r['backend']}")


def _backend(device: str, torch_baseline: bool) -> str:
    """Where a run's optimizer and activation kernels ran."""
    from .._backend import INTERPRETED

    if device.startswith("cuda"):
        return f"CUDA {torch.cuda.get_device_name(device)}"
    return "triton interpreter (CPU)" if INTERPRETED and not torch_baseline else "torch CPU"


def _backend_caveat(runs: list[dict]) -> str | None:
    """The warning under the table when the runs' backends differ, so their speeds do not compare."""
    backends = list(dict.fromkeys(r["backend"] for r in runs))
    if len(backends) < 2:
        return None
    return (f"note: the runs used different backends ({', '.join(backends)}). Triton's interpreter runs "
            "mechgpu's kernels as Python, far slower than compiled code, so tokens/s and ms/step compare only "
            "rows on the same backend; the memory columns compare across all.")


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def _plot(runs: list[dict], out: Path, device: str) -> None:
    """Memory against tokens/s, one point per run: its colour is the implementation and checkpoint
    policy, its marker the accumulation steps and micro-batch size, both read from legends beside
    the axes (no text on the points, which would overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    key = "peak_bytes" if device == "cuda" else "saved_bytes"
    series = list(dict.fromkeys(map(_series, runs)))
    shapes = list(dict.fromkeys(map(_shape, runs)))
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(series)}
    markers = {s: "osD^vP*Xph"[i % 10] for i, s in enumerate(shapes)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        ax.scatter(r["tokens_per_s"] or 0, (r[key] or 0) / 2**20, s=48, alpha=0.8, edgecolors="none",
                   color=colors[_series(r)], marker=markers[_shape(r)])
    point = lambda label, **style: Line2D([], [], linestyle="", label=label, **style)
    by_series = ax.legend(handles=[point(s, marker="o", color=c) for s, c in colors.items()],
                          title="implementation, checkpoint", loc="upper left", bbox_to_anchor=(1.02, 1),
                          fontsize=8, title_fontsize=8)
    ax.add_artist(by_series)
    by_shape = ax.legend(handles=[point(s, marker=m, color="0.3") for s, m in markers.items()],
                         title="a = accumulation steps\nm = micro-batch size", loc="lower left",
                         bbox_to_anchor=(1.02, 0), fontsize=8, title_fontsize=8)
    ax.set_xlabel("tokens/s")
    ax.set_ylabel(("peak memory" if device == "cuda" else "saved activations per micro-batch") + " (MiB)")
    backends = list(dict.fromkeys(r["backend"] for r in runs))
    caveat = "\n(tokens/s compares only runs on the same backend)" if len(backends) > 1 else ""
    ax.set_title(f"memory vs throughput, {' / '.join(backends)}{caveat}", fontsize=10)
    fig.savefig(out, dpi=120, bbox_inches="tight", bbox_extra_artists=[by_series, by_shape])
    plt.close(fig)
