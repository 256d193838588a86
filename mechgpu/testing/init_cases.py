"""The init cases: uniform_, normal_, trunc_normal_, xavier_*, kaiming_* and init_model fill
NaN-poisoned tensors; every element must be written, within its bounds, and the sample mean and
variance must lie within ``STD_ERRORS`` standard errors of the values torch.nn.init's formulas
imply (``oracles``). A bf16/fp16 uniform fill is compared with U[a, b) as torch stores it in that
dtype (``uniform_target``)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch

from .compare import STATS_TOL, Errors, Row, exact_change, sample_errors
from .oracles import NORMAL_KURTOSIS, Target, kaiming_std, truncated_normal_target, uniform_target, xavier_std
from .registry import Case, Context


def _init_shapes(ctx: Context) -> list[tuple[int, ...]]:
    """A non-power-of-2 Linear weight, and in full runs a Conv2d one."""
    return [(257, 129)] if ctx.quick else [(257, 129), (33, 17, 3, 3)]


def _fill(fill: Callable, target: Callable, ctx: Context) -> Iterator[Row]:
    """``fill(mechgpu.init, tensor, generator, label)`` against the Targets of
    ``target(ctx, shape, dtype) -> [(label, Target)]``."""
    import mechgpu.init as mi

    gen = ctx.generator()
    for dtype in ctx.dtypes:
        errs = Errors()
        for shape in _init_shapes(ctx):
            for label, expected in target(ctx, shape, dtype):
                tensor = torch.full(shape, math.nan, dtype=dtype, device=ctx.device)
                fill(mi, tensor, gen, label)
                errs.add(sample_errors(tensor, expected, f"{'x'.join(map(str, shape))} {label}".strip()))
        yield ctx.row("mean, std, bounds", dtype, errs, STATS_TOL)


TANH_GAIN = torch.nn.init.calculate_gain("tanh")
TRUNC_NORMAL_ARGS = {"": (0.3, 1.0, -1.2, 1.5), "tail": (0.0, 2.0, 2.0, 8.0)}
KAIMING_ARGS = {"": (0.0, "fan_in", "relu"), "leaky fan_out": (0.2, "fan_out", "leaky_relu")}


def _symmetric_uniform(std: float, dtype: torch.dtype) -> Target:
    """U[-sqrt(3) std, sqrt(3) std) in ``dtype``: the uniform fill with standard deviation ``std``."""
    return uniform_target(-math.sqrt(3) * std, math.sqrt(3) * std, dtype)


# name -> (fill(mechgpu.init, tensor, generator, label), target(ctx, shape, dtype) -> [(label, Target)])
FILLS = {
    "uniform_": (lambda mi, t, gen, _: mi.uniform_(t, -0.7, 1.3, generator=gen),
                 lambda ctx, shape, dtype: [("", uniform_target(-0.7, 1.3, dtype))]),
    "normal_": (lambda mi, t, gen, _: mi.normal_(t, 0.5, 2.0, generator=gen),
                lambda ctx, shape, dtype: [("", Target(0.5, 2.0, NORMAL_KURTOSIS))]),
    "trunc_normal_": (lambda mi, t, gen, label: mi.trunc_normal_(t, *TRUNC_NORMAL_ARGS[label], generator=gen),
                      lambda ctx, shape, dtype: [(label, truncated_normal_target(*args))
                                                 for label, args in TRUNC_NORMAL_ARGS.items()
                                                 if label == "" or not ctx.quick]),
    "xavier_uniform_": (lambda mi, t, gen, _: mi.xavier_uniform_(t, gain=TANH_GAIN, generator=gen),
                        lambda ctx, shape, dtype: [("", _symmetric_uniform(xavier_std(shape, TANH_GAIN), dtype))]),
    "xavier_normal_": (lambda mi, t, gen, _: mi.xavier_normal_(t, gain=TANH_GAIN, generator=gen),
                       lambda ctx, shape, dtype: [("", Target(0.0, xavier_std(shape, TANH_GAIN), NORMAL_KURTOSIS))]),
    "kaiming_uniform_": (lambda mi, t, gen, label: mi.kaiming_uniform_(t, *KAIMING_ARGS[label], generator=gen),
                         lambda ctx, shape, dtype: [(label, _symmetric_uniform(kaiming_std(shape, *args), dtype))
                                                    for label, args in KAIMING_ARGS.items()]),
    "kaiming_normal_": (lambda mi, t, gen, label: mi.kaiming_normal_(t, *KAIMING_ARGS[label], generator=gen),
                        lambda ctx, shape, dtype: [(label, Target(0.0, kaiming_std(shape, *args), NORMAL_KURTOSIS))
                                                   for label, args in KAIMING_ARGS.items()]),
}


def _init_model(ctx: Context) -> Iterator[Row]:
    """init_model: He's rule before ReLU, Glorot's with tanh's gain before Tanh and gain 1 at the
    end (torch.nn.init's gains and fans), biases zeroed, everything written."""
    from torch import nn

    import mechgpu.init as mi

    gen = ctx.generator()
    sizes = (129, 257, 65, 10)
    stds = [torch.nn.init.calculate_gain("relu") / math.sqrt(sizes[0]),
            xavier_std((sizes[2], sizes[1]), TANH_GAIN), xavier_std((sizes[3], sizes[2]), 1.0)]
    for dtype in ctx.dtypes:
        weights, biases = Errors(), Errors()
        for distribution in ("normal", "uniform"):
            model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]), nn.Tanh(),
                                  nn.Linear(sizes[2], sizes[3])).to(ctx.device, dtype)
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
            mi.init_model(model, distribution=distribution, generator=gen)
            for layer, std in zip(model[::2], stds):
                bound = math.sqrt(3) * std
                target = Target(0.0, std, NORMAL_KURTOSIS)
                if distribution == "uniform":
                    target = uniform_target(-bound, bound, dtype)
                weights.add(sample_errors(layer.weight, target, f"{distribution} {tuple(layer.weight.shape)}"))
                biases.add(exact_change([torch.zeros_like(layer.bias)], [layer.bias], f"{distribution} bias"))
        yield ctx.row("weights: mean, std, bounds", dtype, weights, STATS_TOL)
        yield ctx.row("biases zeroed", dtype, biases, "exact")


CASES = (
    *(Case(f"init.{name}", functools.partial(_fill, fill, target)) for name, (fill, target) in FILLS.items()),
    Case("init.init_model", _init_model),
)
