"""``mechgpu flow``: watch activations and gradients propagate through a deep MLP.

The network has ``depth`` hidden layers, each ``Linear(width, width)`` followed by the
activation, then a ``Linear(width, 256)`` head that predicts the next byte. The batch is
real text, with nothing to download: windows of ``width`` consecutive bytes of the Python
standard library's own source (``mechgpu.tools.gpt.stdlib_text``), standardised to mean 0 and
std 1, with the byte that follows each window as the target. One forward and one backward
pass (cross-entropy) run under a ``SignalRecorder`` on the activation modules, for each
initialisation asked for; the per-layer tables, a summary and one PNG overlaying the runs
come out.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import init as mi
from ..diagnostics import LayerSignal, SignalRecorder, plot_signals, signal_ratios, signal_table
from .gpt import stdlib_text

ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU,
               "gelu": nn.GELU, "silu": nn.SiLU, "selu": nn.SELU, "linear": nn.Identity}
INITS = {
    "auto": "mechgpu.init.init_model: Xavier before tanh/sigmoid/nothing (torch's gains: 5/3 for "
            "tanh), He before the ReLU family, GELU and SiLU",
    "xavier": "Glorot & Bengio (2010) for every layer, gain 1 (init_model scheme='xavier')",
    "kaiming": "He et al. (2015) for every layer, fan_in and the activation's gain "
               "(init_model scheme='kaiming')",
    "normal": "naive: every weight N(0, 1), biases 0",
    "torch": "torch.nn.Linear's own default (kaiming_uniform_ with a=sqrt(5), uniform biases)",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLASSES = 256
# A hidden layer counts as saturated when most of its tanh units sit at |a| >= 0.99.
SATURATION = 0.99


def build_mlp(depth: int, width: int, activation: str) -> nn.Sequential:
    """fc1, act1, ..., fc{depth}, act{depth}, head: ``depth`` hidden layers and a byte classifier."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(width, width)
        layers[f"act{i}"] = ACTIVATIONS[activation]()
    layers["head"] = nn.Linear(width, CLASSES)
    return nn.Sequential(layers)


def text_batch(batch: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [batch, width] of standardised bytes, next-byte targets [batch]) from stdlib source."""
    data = torch.tensor(list(stdlib_text().encode("utf-8")), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - width - 1, (batch,), generator=gen)
    x = data[starts[:, None] + torch.arange(width)].float()
    return (x - x.mean()) / x.std(), data[starts + width].long()


def initialise(model: nn.Sequential, init: str, generator: torch.Generator) -> str:
    """Apply one of INITS to ``model``; returns a one-line description of what was done."""
    if init == "torch":
        return INITS[init]
    if init == "normal":
        for module in model:
            if isinstance(module, nn.Linear):
                mi.normal_(module.weight, 0.0, 1.0, generator=generator)
                nn.init.zeros_(module.bias)
        return INITS[init]
    table = mi.init_model(model, scheme=init, generator=generator)
    chosen: dict[tuple, int] = {}
    for row in table:
        key = (row.rule, row.activation, round(row.gain, 4))
        chosen[key] = chosen.get(key, 0) + 1
    parts = [f"{n} x {rule} (before {act}, gain {gain:g})" for (rule, act, gain), n in chosen.items()]
    return f"init_model(scheme={init!r}): " + ", ".join(parts) + \
        f"; {table.launches} kernel launch{'es' if table.launches != 1 else ''}"


@dataclass
class FlowRun:
    """The outcome of one initialisation: per-layer signals and their summary."""

    init: str
    description: str
    rows: list[LayerSignal]
    activation_ratio: float | None  # act std, last hidden layer / first
    gradient_ratio: float | None  # grad std, first hidden layer / last
    saturated: float | None  # mean share of |a| >= 0.99 over the hidden layers (tanh only)
    loss: float


def measure(depth: int, width: int, activation: str, init: str, *, batch: int = 512,
            dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> FlowRun:
    """Build the MLP, initialise it with ``init``, run one forward and backward pass, record."""
    torch.manual_seed(seed)  # the same torch default init and the same data for every run
    model = build_mlp(depth, width, activation).to(device=device, dtype=dtype)
    description = initialise(model, init, torch.Generator().manual_seed(seed))
    x, y = text_batch(batch, width, seed)
    x, y = x.to(device=device, dtype=dtype), y.to(device)
    hidden = [(f"act{i}", model[2 * i - 1]) for i in range(1, depth + 1)]
    with SignalRecorder(model, hidden, saturation=SATURATION if activation == "tanh" else None) as rec:
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
    rows = rec.rows()
    ratios = signal_ratios(rows)
    sat = [r.act_saturated for r in rows if r.act_saturated is not None]
    return FlowRun(init, description, rows, ratios["activation"], ratios["gradient"],
                   sum(sat) / len(sat) if sat else None, loss.item())


def _verdict(ratio: float | None, saturated: float | None = None) -> str:
    if ratio is None:
        return "-"
    if saturated is not None and saturated > 0.5:
        return "saturated"
    if ratio < 0.1:
        return "vanishing"
    if ratio > 10:
        return "exploding"
    return "steady" if 0.5 <= ratio <= 2 else "drifting"


def run_flow(depth: int, width: int, activation: str, inits: list[str], *, batch: int, dtype: str,
             device: str, seed: int, plot: Path | None) -> list[FlowRun]:
    """``mechgpu flow``: measure each init, print the tables and a summary, write the plot."""
    mode = "CUDA" if device == "cuda" else "CPU (init kernels in Triton's interpreter)"
    print(f"mechgpu flow: {depth} hidden layers of {width} {activation} units + a {CLASSES}-way head, "
          f"{dtype}, one batch of {batch} windows of stdlib source; device: {mode}\n")
    runs = []
    for init in inits:
        run = measure(depth, width, activation, init, batch=batch, dtype=DTYPES[dtype], device=device,
                      seed=seed)
        runs.append(run)
        print(f"== init {init}: {run.description}")
        print(signal_table(run.rows))
        print()
    header = f"{'init':<9} {'act std L1':>11} {f'act std L{depth}':>12} {'act ratio':>10} " \
             f"{'grad std L1':>12} {f'grad std L{depth}':>13} {'grad ratio':>11} {'saturated':>10} {'loss':>7}"
    print(header)
    print("-" * len(header))
    for run in runs:
        first, last = run.rows[0], run.rows[-1]
        sat = "-" if run.saturated is None else f"{run.saturated:.0%}"
        print(f"{run.init:<9} {first.act_std:>11.4g} {last.act_std:>12.4g} {run.activation_ratio:>10.3g} "
              f"{first.grad_std:>12.4g} {last.grad_std:>13.4g} {run.gradient_ratio:>11.3g} {sat:>10} "
              f"{run.loss:>7.3f}")
    print("act ratio = act std at the last hidden layer / the first; grad ratio = grad std at the first "
          "hidden layer / the last (the end of the backward pass / its start); saturated = share of "
          f"|a| >= {SATURATION} (tanh). Verdicts (within 2x: steady, below 1/10: vanishing, above 10: "
          "exploding, more than half saturated: saturated): " +
          "; ".join(f"{r.init}: activations {_verdict(r.activation_ratio, r.saturated)}, gradients "
                    f"{_verdict(r.gradient_ratio)}" for r in runs))
    if plot is not None:
        title = f"{depth} x {width} {activation} MLP, {dtype}: std per hidden layer"
        labels = {r.init + ("" if r.saturated is None else f" ({r.saturated:.0%} saturated)"): r.rows
                  for r in runs}
        path = plot_signals(labels, plot, title=title)
        print(f"\nwrote {path}")
    return runs
