"""The clipping cases: ``clip_grad_norm_``, ``get_total_norm`` and ``clip_grads_with_norm_`` for
every norm type in ``CLIP_NORM_TYPES`` (2, 1, inf, -inf, 3, 3.5, 0.5, -1 and -2.5) in fp32/bf16/fp16,
against ``torch.nn.utils``' own functions run on float64 copies of the grads; and grads of 1e30,
whose squares overflow fp32."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch

from .compare import NORM_RTOL, NORM_TOL, Errors, Row, measure, norm_tolerance
from .registry import Case, Context

CLIP_NORM_TYPES = {"norm2": 2.0, "norm1": 1.0, "norm_inf": math.inf, "norm_-inf": -math.inf, "norm3": 3.0,
                   "norm3.5": 3.5, "norm0.5": 0.5, "norm-1": -1.0, "norm-2.5": -2.5}


def _params_with_grads(grads: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Zero params holding copies of ``grads`` (in ``dtype``, default the grads' own)."""
    params = []
    for g in grads:
        p = torch.zeros(g.shape, dtype=dtype or g.dtype, device=g.device, requires_grad=True)
        p.grad = g.to(dtype or g.dtype).clone()
        params.append(p)
    return params


def _norm(norm_type: float, ctx: Context) -> Iterator[Row]:
    """clip_grad_norm_, get_total_norm and clip_grads_with_norm_ against torch.nn.utils' on float64 copies."""
    import mechgpu

    gen = ctx.generator()
    # torch rejects the norm of an empty tensor where the reduction has no identity (p = ±inf, p < 0)
    sizes = [n for n in ctx.sizes if n or (math.isfinite(norm_type) and norm_type > 0)]
    for dtype in ctx.dtypes:
        rtol, atol, tol = norm_tolerance(dtype)
        grads = [ctx.randn(n, gen, scale=3.0, dtype=dtype) for n in sizes]

        ref_p = _params_with_grads(grads, torch.float64)
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref_p], norm_type, foreach=False)
        max_norm = 0.5 * ref_norm.item()  # so that clipping happens
        torch.nn.utils.clip_grad_norm_(ref_p, max_norm, norm_type, foreach=False)
        ours_p = _params_with_grads(grads)
        norm = mechgpu.clip_grad_norm_(ours_p, max_norm, norm_type)
        yield ctx.row("clip_grad_norm_: norm", dtype, measure(norm, ref_norm, rtol=rtol, atol=atol, dtype=dtype),
                      tol)
        clipped = Errors()
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            clipped.add(measure(a.grad, b.grad, rtol=rtol, atol=atol, dtype=dtype, what=f"grad {i}"))
        yield ctx.row("clip_grad_norm_: grads", dtype, clipped, tol)

        total = mechgpu.get_total_norm([g.clone() for g in grads], norm_type)
        yield ctx.row("get_total_norm", dtype, measure(total, ref_norm, rtol=rtol, atol=atol, dtype=dtype), tol)

        ours_p, ref_p = _params_with_grads(grads), _params_with_grads(grads, torch.float64)
        given = ref_norm.to(dtype)
        mechgpu.clip_grads_with_norm_(ours_p, max_norm, given)
        torch.nn.utils.clip_grads_with_norm_(ref_p, max_norm, given.double(), foreach=False)
        clipped = Errors()
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            clipped.add(measure(a.grad, b.grad, rtol=rtol, atol=atol, dtype=dtype, what=f"grad {i}"))
        yield ctx.row("clip_grads_with_norm_: grads", dtype, clipped, tol)


def _large_grads(ctx: Context) -> Iterator[Row]:
    """|g| ~ 1e30: g^2 overflows fp32, the norm must not."""
    import mechgpu

    gen = ctx.generator()
    grads = [ctx.randn(n, gen, scale=1e30) for n in ctx.sizes if n]  # the inf norm of an empty tensor is an error
    for norm_type in (2.0, 1.0, math.inf, 3.0):
        expected = torch.nn.utils.get_total_norm([g.double() for g in grads], norm_type, foreach=False)
        got = mechgpu.get_total_norm(grads, norm_type)
        yield ctx.row(f"get_total_norm p={norm_type:g}", torch.float32,
                      measure(got, expected, rtol=NORM_RTOL, atol=0.0, dtype=torch.float32), NORM_TOL)


CASES = (
    *(Case(f"clip.{name}", functools.partial(_norm, norm_type)) for name, norm_type in CLIP_NORM_TYPES.items()),
    Case("clip.large_grads", _large_grads),
)
