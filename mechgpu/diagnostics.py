"""Signal-propagation diagnostics: how activations and gradients change from layer to layer.

``SignalRecorder(model)`` puts hooks on a model's layers. Each forward pass records, per
layer, the mean and standard deviation of the layer's output (and, if asked, the share of
saturated outputs); the backward pass records the norm and standard deviation of the
gradient of the loss with respect to that output. ``table()`` prints them, ``plot()``
draws the standard deviations per layer as a PNG (matplotlib, Agg, no display needed), and
``ratios()`` sums a run up in two numbers:

* activations: std at the last recorded layer / std at the first;
* gradients: std at the first recorded layer / std at the last, i.e. at the end of the
  backward pass relative to where it starts.

Below 1 a signal vanishes on its way through the network, above 1 it explodes. Every
statistic is computed in fp32 on the device and read back only when asked for.

    with SignalRecorder(model) as rec:
        loss_fn(model(x), y).backward()
    print(rec.table())
    rec.plot("signals.png")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ._text import text_table
from .init import ACTIVATION_MODULES, WEIGHT_LAYERS

__all__ = ["LayerSignal", "SignalRecorder", "default_layers", "plot_signals", "signal_ratios", "signal_table"]


@dataclass
class LayerSignal:
    """One layer's statistics from the last forward and backward pass (None if not yet seen)."""

    name: str
    layer: str  # the module's class name
    act_mean: float | None = None
    act_std: float | None = None
    act_saturated: float | None = None  # share of outputs with |x| >= the recorder's saturation
    grad_norm: float | None = None
    grad_std: float | None = None


def default_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear/Conv layer and every activation module (torch.nn's or mechgpu.nn's)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, WEIGHT_LAYERS) or type(m).__name__ in ACTIVATION_MODULES]


def _first_tensor(output) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    return None


class SignalRecorder:
    """Forward hooks (and gradient hooks on the outputs) on chosen layers of a model.

    ``layers``: ``(name, module)`` pairs to watch; by default ``default_layers(model)``.
    ``saturation``: if given, also record the share of outputs with ``|x| >= saturation``
    (0.99 flags a saturated tanh). A layer called several times per pass keeps its last
    call. Use as a context manager, or call ``remove()`` when done.
    """

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]] | None = None, *,
                 saturation: float | None = None) -> None:
        self.saturation = saturation
        self._layers = list(layers) if layers is not None else default_layers(model)
        self._stats: dict[str, dict[str, Tensor]] = {}
        self._order: list[str] = []
        self._handles = [m.register_forward_hook(self._forward_hook(name)) for name, m in self._layers]
        self._kinds = {name: type(m).__name__ for name, m in self._layers}

    def __enter__(self) -> SignalRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Take the hooks off the model; the recorded statistics stay."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            out = _first_tensor(output)
            if out is None:
                return
            if name not in self._order:
                self._order.append(name)
            with torch.no_grad():
                x = out.detach().float()
                stats = {"act_mean": x.mean(), "act_std": x.std()}
                if self.saturation is not None:
                    stats["act_saturated"] = (x.abs() >= self.saturation).float().mean()
            self._stats[name] = stats
            if out.requires_grad:
                out.register_hook(self._grad_hook(name))
        return hook

    def _grad_hook(self, name: str):
        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                g = grad.detach().float()
                self._stats[name].update(grad_norm=g.norm(), grad_std=g.std())
        return hook

    # ------------------------------------------------------------------------------
    def rows(self) -> list[LayerSignal]:
        """One LayerSignal per recorded layer, in the order of the forward pass."""
        rows = []
        for name in self._order:
            values = {k: float(v) for k, v in self._stats[name].items()}
            rows.append(LayerSignal(name, self._kinds[name], **values))
        return rows

    def ratios(self) -> dict[str, float | None]:
        """{'activation': std last / std first, 'gradient': grad std first / grad std last}."""
        return signal_ratios(self.rows())

    def table(self) -> str:
        """The per-layer statistics as a text table."""
        return signal_table(self.rows())

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Write a PNG of the activation and gradient std per layer; returns its path."""
        return plot_signals({"": self.rows()}, path, title=title)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def signal_ratios(rows: list[LayerSignal]) -> dict[str, float | None]:
    """See ``SignalRecorder.ratios``."""
    if not rows:
        return {"activation": None, "gradient": None}
    return {"activation": _ratio(rows[-1].act_std, rows[0].act_std),
            "gradient": _ratio(rows[0].grad_std, rows[-1].grad_std)}


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def signal_table(rows: list[LayerSignal]) -> str:
    """One line per layer: activation mean/std (and saturation), gradient norm/std."""
    with_sat = any(r.act_saturated is not None for r in rows)
    header = ("#", "layer", "type", "act mean", "act std") + (("saturated",) if with_sat else ()) + \
        ("grad norm", "grad std")
    lines = []
    for i, r in enumerate(rows, 1):
        sat = (_fmt(r.act_saturated, ".1%"),) if with_sat else ()
        lines.append((str(i), r.name, r.layer, _fmt(r.act_mean, ".3g"), _fmt(r.act_std)) + sat +
                     (_fmt(r.grad_norm), _fmt(r.grad_std)))
    ratios = signal_ratios(rows)
    footer = (f"std ratios over {len(rows)} layers: activations last/first "
              f"{_fmt(ratios['activation'], '.3g')}, gradients first/last {_fmt(ratios['gradient'], '.3g')}")
    return text_table(header, lines) + "\n" + footer


def plot_signals(runs: dict[str, list[LayerSignal]], path: str | Path, *, title: str = "") -> Path:
    """Write a PNG with two panels, activation std and gradient std per layer (log scale),
    one line per run (``runs`` maps a label to its rows). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = (("act_std", "activation std (forward)", "activation"),
              ("grad_std", "gradient std (backward)", "gradient"))
    for ax, (field, label, ratio_key) in zip(axes, panels):
        for run, rows in runs.items():
            xs = [i for i, r in enumerate(rows, 1) if getattr(r, field) is not None]
            ys = [getattr(r, field) for r in rows if getattr(r, field) is not None]
            ratio = signal_ratios(rows)[ratio_key]
            tag = f"{run}: " if run else ""
            ax.plot(xs, ys, marker="o", markersize=3,
                    label=f"{tag}{'last/first' if field == 'act_std' else 'first/last'} {_fmt(ratio, '.3g')}")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
