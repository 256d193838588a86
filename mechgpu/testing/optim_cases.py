"""The optimizer cases: ONE table of configurations (``OPTIMIZERS``) and the checks that loop over it.

Each ``OptimInfo`` record is one optimizer: its lr, the ``variants`` whose trajectories are checked
against ``torch.optim`` (``foreach=False``; fp32 over several steps and two param groups, bf16/fp16
where each step must equal torch's fp32 step from the same point, rounded once), the ``featured``
configuration every fused option is checked with (``max_grad_norm``, ``skip_nonfinite``,
``master_weights``, ``state_dtype=torch.bfloat16`` and ``"8bit"``, ``track_update_norm``, ``telemetry``,
``torch.amp.GradScaler``, state mutations), and the ``mutated`` configurations
tests/test_optim_safety.py mutates between steps. ``mechgpu check`` and the tests read the flat
``OptimCase`` tuples derived from it, so a new optimizer is one record.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import torch

from ..kernels.optim_spec import NONNEGATIVE_KEYS, SPECS
from .compare import (
    FP32_PARAM_ATOL,
    FP32_PARAM_RTOL,
    FP32_PARAM_TOL,
    FP32_ULP,
    LOW_PRECISION,
    NORM_RTOL,
    NORM_TOL,
    QUANT8_TOL,
    STATE_ATOL_SCALE,
    STATE_RTOL,
    STATE_TOL,
    STATE_TOL_EXACT,
    Errors,
    Row,
    code_errors,
    eps,
    exact_change,
    measure,
    one_ulp_tolerance,
)
from .oracles import quant8_initial_state, quant8_reference_step
from .registry import Case, Context


@dataclass(frozen=True)
class OptimCase:
    """One configuration: ``mechgpu.optim.<optimizer>`` and its ``torch.optim`` twin built with
    ``lr`` and ``options``; ``name`` is the check case's (``optim.<name>``) and the pytest id."""

    name: str
    optimizer: str
    options: dict
    lr: float

    def has(self, option: str) -> bool:
        """Whether ``option`` is on (a true flag or a nonzero value)."""
        return bool(self.options.get(option))

    def accepts(self, option: str) -> bool:
        """Whether some configuration of this optimizer in ``OPTIMIZERS`` turns ``option`` on."""
        return any(c.has(option) for c in ALL if c.optimizer == self.optimizer)

    def torch_takes(self, argument: str) -> bool:
        """Whether the torch.optim twin's constructor has ``argument`` (fused, capturable, betas, ...)."""
        return argument in inspect.signature(getattr(torch.optim, self.optimizer)).parameters


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer (its class in mechgpu.optim and torch.optim) and its configurations by name."""

    name: str
    lr: float
    variants: dict[str, dict]  # the trajectories against torch: `mechgpu check`'s optim.<name> cases
    featured: tuple[str, dict]  # the configuration each fused option is checked with
    mutated: dict[str, dict]  # the configurations tests/test_optim_safety.py mutates

    def cases(self, configs: dict[str, dict]) -> tuple[OptimCase, ...]:
        return tuple(OptimCase(name, self.name, options, self.lr) for name, options in configs.items())


OPTIMIZERS = (
    OptimInfo("Adam", 1e-2, variants={
        "Adam": {},
        "Adam-amsgrad": {"amsgrad": True, "weight_decay": 0.1},
        "Adam-decoupled-maximize": {"decoupled_weight_decay": True, "weight_decay": 0.3, "maximize": True,
                                    "betas": (0.8, 0.99), "eps": 1e-6},
        "Adam-maximize-betas": {"maximize": True, "betas": (0.8, 0.99), "eps": 1e-6},
        "Adam-decoupled-amsgrad": {"decoupled_weight_decay": True, "weight_decay": 0.3, "amsgrad": True},
    }, featured=("Adam", {}), mutated={"Adam": {"weight_decay": 0.1}, "Adam-amsgrad": {"amsgrad": True}}),
    OptimInfo("AdamW", 1e-2, variants={
        "AdamW": {},
        "AdamW-amsgrad-maximize": {"amsgrad": True, "maximize": True, "weight_decay": 0.5},
    }, featured=("AdamW-amsgrad", {"amsgrad": True}), mutated={"AdamW": {"weight_decay": 0.3}}),
    OptimInfo("RMSprop", 1e-3, variants={
        "RMSprop": {},
        "RMSprop-centered": {"centered": True, "weight_decay": 0.1},
        "RMSprop-momentum-maximize": {"momentum": 0.9, "maximize": True, "alpha": 0.9},
        "RMSprop-centered-momentum": {"centered": True, "momentum": 0.5, "weight_decay": 0.1, "alpha": 0.9,
                                      "eps": 1e-4},
    }, featured=("RMSprop-momentum", {"momentum": 0.9}),
        mutated={"RMSprop": {"alpha": 0.9}, "RMSprop-centered-momentum": {"centered": True, "momentum": 0.5}}),
    OptimInfo("SGD", 1e-2, variants={
        "SGD": {},
        "SGD-momentum": {"momentum": 0.9, "weight_decay": 0.1},
        "SGD-nesterov": {"momentum": 0.9, "nesterov": True, "maximize": True},
        "SGD-dampening": {"momentum": 0.5, "dampening": 0.3, "weight_decay": 0.01},
    }, featured=("SGD-nesterov", {"momentum": 0.9, "nesterov": True}),
        mutated={"SGD": {}, "SGD-momentum": {"momentum": 0.9, "nesterov": True}}),
    OptimInfo("Adagrad", 1e-2, variants={
        "Adagrad": {},
        "Adagrad-decay": {"lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.1},
        "Adagrad-maximize": {"maximize": True, "eps": 1e-6, "initial_accumulator_value": 0.5},
    }, featured=("Adagrad", {}), mutated={"Adagrad": {"lr_decay": 0.01, "initial_accumulator_value": 0.1}}),
)
VARIANTS = tuple(c for info in OPTIMIZERS for c in info.cases(info.variants))
FEATURED = tuple(c for info in OPTIMIZERS for c in info.cases(dict([info.featured])))
MUTATED = tuple(c for info in OPTIMIZERS for c in info.cases(info.mutated))
ALL = VARIANTS + FEATURED + MUTATED


def first_of_each(cases: tuple[OptimCase, ...], key: Callable[[OptimCase], Hashable]) -> tuple[OptimCase, ...]:
    """The first of ``cases`` for each value of ``key``, in their order."""
    first: dict[Hashable, OptimCase] = {}
    for case in cases:
        first.setdefault(key(case), case)
    return tuple(first.values())


def one_per_rule(cases: tuple[OptimCase, ...]) -> tuple[OptimCase, ...]:
    """The first of ``cases`` for each kernel rule (``OptimizerSpec.rule``: AdamW runs Adam's), for
    the tests whose subject is the kernel's code path rather than each torch twin."""
    return first_of_each(cases, lambda case: SPECS[case.optimizer].rule)


def _optimizers(case: OptimCase, ours_params, ref_params, opts: dict | None = None, *, groups: bool = False,
                **ours_options):
    """mechgpu's optimizer and torch's (foreach=False) twin, with the same groups and options
    (``opts``: instead of the case's own)."""
    import mechgpu.optim as mo

    opts = case.options if opts is None else opts

    def param_groups(params):
        if not groups:
            return params
        half = len(params) // 2
        return [{"params": params[:half]}, {"params": params[half:], "lr": case.lr * 0.5}]

    ours = getattr(mo, case.optimizer)(param_groups(ours_params), lr=case.lr, **opts, **ours_options)
    ref = getattr(torch.optim, case.optimizer)(param_groups(ref_params), lr=case.lr, foreach=False, **opts)
    return ours, ref


def _leaves(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in tensors]


def state_errors(ours_opt, ours_params, ref_opt, ref_params, *, rtol: float = STATE_RTOL,
                  state_dtype: torch.dtype = torch.float32, exact_opt=None, exact_params=None) -> Errors:
    """Every optimizer state against torch's (torch's in fp32), with an atol of 1e-6 of the
    state's largest entry over all params (an entry that is a small difference of large terms,
    as a momentum buffer can be, carries rounding errors of the terms' size). With torch's
    float64 twin (``exact_opt`` over ``exact_params``), each element may also differ by twice
    torch's own fp32 error: where a trajectory is ill-conditioned, two correct fp32 runs land
    on either side of the exact value."""
    from mechgpu.optim._fused import MASTER_KEY

    errs = Errors()
    scale: dict[str, float] = {}
    for pr in ref_params:
        for key, value in ref_opt.state[pr].items():
            if key != "step" and torch.is_tensor(value) and value.numel():
                scale[key] = max(scale.get(key, 0.0), value.abs().max().item())
    for i, (po, pr) in enumerate(zip(ours_params, ref_params)):
        ours_state = {k: v for k, v in ours_opt.state[po].items() if k != MASTER_KEY}
        ref_state = ref_opt.state[pr]
        if set(ours_state) != set(ref_state):
            errs.fail(f"param {i}: state keys {sorted(ours_state)}, torch has {sorted(ref_state)}")
            continue
        for key, expected in ref_state.items():
            expected = torch.as_tensor(expected).float()
            if key == "step":
                errs.add(measure(ours_state[key].float().reshape(()), expected.reshape(()), rtol=0.0, atol=0.0,
                                 what=f"param {i} step"))
                continue
            atol = STATE_ATOL_SCALE * scale.get(key, 0.0)
            own_error = None
            if exact_opt is not None:
                exact = exact_opt.state[exact_params[i]][key]
                own_error = 2 * (expected.double() - exact.double()).abs()
            errs.add(measure(ours_state[key], expected, rtol=rtol, atol=atol, dtype=state_dtype, extra=own_error,
                             what=f"param {i} {key}"))
    return errs


def _fp32_param_errors(ours_p: list[torch.Tensor], ref_p: list[torch.Tensor]) -> Errors:
    """fp32 params against torch's, at FP32_PARAM_TOL."""
    errs = Errors()
    for i, (a, b) in enumerate(zip(ours_p, ref_p)):
        errs.add(measure(a, b, rtol=FP32_PARAM_RTOL, atol=FP32_PARAM_ATOL, dtype=torch.float32, what=f"param {i}"))
    return errs


def _set_grads(ctx: Context, gen, param_lists: list[list[torch.Tensor]], scale: float = 1.0) -> None:
    """The same random grads for every list: drawn in the first list's dtype, then a copy in
    each param's dtype (so torch's fp32 twin of a bf16 param sees the same bf16 values)."""
    for tensors in zip(*param_lists):
        g = ctx.randn(tensors[0].shape, gen, scale=scale, dtype=tensors[0].dtype)
        for p in tensors:
            p.grad = g.to(p.dtype, copy=True)


def _low_precision_options(case: OptimCase) -> dict:
    """The options for the bf16/fp16 runs: coupled weight decay (Adam's, RMSprop's, Adagrad's) is left
    to the fp32 runs. Their first step divides g + wd p by about |g + wd p| + eps, and on the coarse
    bf16/fp16 grids a grad often cancels wd p exactly (g = -0.168, p = 1.68): the step then turns
    on how fp32 rounds g + wd p (with an fma or not), not on the kernel being right. SGD's step does
    not divide, and AdamW's decay is decoupled."""
    decoupled = case.optimizer == "AdamW" or case.has("decoupled_weight_decay")
    coupled = case.optimizer != "SGD" and not decoupled
    return {k: v for k, v in case.options.items() if not (coupled and k == "weight_decay")}


def _trajectories(case: OptimCase, ctx: Context) -> Iterator[Row]:
    """fp32 trajectories over several steps and two param groups against torch (and torch in
    float64 for the states); bf16/fp16 params where each step is torch's fp32 step, rounded once."""
    gen = ctx.generator()
    # fp32: the trajectories over several steps, two param groups
    ours_p = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
    ref_p, exact_p = _leaves(ours_p), _leaves(ours_p, torch.float64)
    ours, ref = _optimizers(case, ours_p, ref_p, groups=True)
    exact = _optimizers(case, ours_p, exact_p, groups=True)[1]  # torch in float64
    for _ in range(ctx.steps):
        _set_grads(ctx, gen, [ours_p, ref_p, exact_p])
        ours.step()
        ref.step()
        exact.step()
    params = _fp32_param_errors(ours_p, ref_p)
    yield ctx.row(f"params, {ctx.steps} steps", torch.float32, params, FP32_PARAM_TOL)
    yield ctx.row("states", torch.float32, state_errors(ours, ours_p, ref, ref_p, exact_opt=exact,
                                                        exact_params=exact_p), STATE_TOL_EXACT)

    # bf16/fp16 params: each step is torch's fp32 step from the same point, rounded once
    for dtype in LOW_PRECISION:
        rtol, atol, tol = one_ulp_tolerance(dtype)
        ours_p = [ctx.randn(n, gen, dtype=dtype).requires_grad_() for n in ctx.sizes]
        ref_p = _leaves(ours_p, torch.float32)
        ours, ref = _optimizers(case, ours_p, ref_p, _low_precision_options(case))
        params = Errors()
        for _ in range(ctx.steps):
            _set_grads(ctx, gen, [ours_p, ref_p])
            with torch.no_grad():
                for r, p in zip(ref_p, ours_p):
                    r.copy_(p.float())
            before = [p.detach().float() for p in ours_p]
            ours.step()
            ref.step()
            for i, (a, b, start) in enumerate(zip(ours_p, ref_p, before)):
                # a step that cancels the param to ~0 carries the fp32 rounding of its operands
                operands = FP32_ULP * (start.abs() + b.detach().abs())
                params.add(measure(a, b.detach().to(dtype), rtol=rtol, atol=atol, dtype=dtype, extra=operands,
                                   what=f"param {i}"))
        yield ctx.row("params vs torch fp32 step", dtype, params, f"rtol {rtol:.2g} + 2^-23 |p|")
        yield ctx.row("fp32 states", dtype, state_errors(ours, ours_p, ref, ref_p), STATE_TOL)


def _max_grad_norm(ctx: Context) -> Iterator[Row]:
    """Clipping inside the step against torch.nn.utils.clip_grad_norm_ and torch's step."""
    gen = ctx.generator()
    max_norm = 1.5
    for case in FEATURED:
        ours_p = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
        ref_p = _leaves(ours_p)
        ours, ref = _optimizers(case, ours_p, ref_p, groups=True, max_grad_norm=max_norm)
        params, norms, untouched = Errors(), Errors(), Errors()
        for step in range(ctx.steps):
            scale = 1e-3 if step == 1 else 1.0  # a step whose norm is under max_norm: no clipping
            _set_grads(ctx, gen, [ours_p, ref_p], scale=scale)
            given = [p.grad.clone() for p in ours_p]
            ours.step()
            ref_norm = torch.nn.utils.clip_grad_norm_(ref_p, max_norm, foreach=False)
            ref.step()
            norms.add(measure(ours.last_grad_norm.reshape(()), ref_norm.reshape(()), rtol=NORM_RTOL, atol=0.0,
                              what="last_grad_norm"))
            untouched.add(exact_change(given, [p.grad for p in ours_p], "grad"))
        params.add(_fp32_param_errors(ours_p, ref_p))
        yield ctx.row(f"{case.name} params", torch.float32, params, FP32_PARAM_TOL)
        yield ctx.row(f"{case.name} last_grad_norm", torch.float32, norms, NORM_TOL)
        yield ctx.row(f"{case.name} grads not rescaled", torch.float32, untouched, "exact")


def _unaligned_and_transposed(ctx: Context, gen) -> list[torch.Tensor]:
    """Leaf params off the fast path: at storage offset 1 (not 16-byte aligned) and a transposed weight."""
    base = ctx.randn(ctx.sizes[-1] + 1, gen)
    return [base[1:].detach().requires_grad_(), ctx.randn((17, 33), gen).t().detach().requires_grad_()]


# Mutations users make between steps, each applied alike to mechgpu's optimizer and torch's.
def _replace_states(opt, params) -> None:
    for key, value in list(opt.state[params[0]].items()):
        if torch.is_tensor(value):
            opt.state[params[0]][key] = value.clone()


def _swap_data(opt, params) -> None:
    params[-1].data = params[-1].data.clone()


def _clear_state(opt, params) -> None:
    opt.state.clear()


STATE_MUTATIONS = (("states replaced", _replace_states), (".data swapped", _swap_data),
                   ("state cleared", _clear_state))


def _state_mutations(ctx: Context) -> Iterator[Row]:
    """Steps with STATE_MUTATIONS in between, on aligned, unaligned and transposed params, against
    torch.optim given the same mutations (under compute-sanitizer, a stale address would show here)."""
    gen = ctx.generator()
    for case in FEATURED:
        ours_p = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes] + _unaligned_and_transposed(ctx, gen)
        ref_p = _leaves(ours_p)
        ours, ref = _optimizers(case, ours_p, ref_p, max_grad_norm=math.inf)
        for _, mutate in ((None, None),) + STATE_MUTATIONS:
            if mutate is not None:
                mutate(ours, ours_p)
                mutate(ref, ref_p)
            _set_grads(ctx, gen, [ours_p, ref_p])
            for p in ours_p:
                p.grad = torch.empty_like(p).copy_(p.grad)  # the param's strides (the transposed one's)
            ours.step()
            ref.step()
        params = _fp32_param_errors(ours_p, ref_p)
        yield ctx.row(f"{case.name} params, mutated", torch.float32, params, FP32_PARAM_TOL)
        yield ctx.row(f"{case.name} states", torch.float32, state_errors(ours, ours_p, ref, ref_p), STATE_TOL)


def _skip_nonfinite(ctx: Context) -> Iterator[Row]:
    """An inf or NaN grad leaves params and states as they were; the next finite step goes through."""
    gen = ctx.generator()
    for case in FEATURED:
        params = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
        ours, _ = _optimizers(case, params, _leaves(params), max_grad_norm=1.0, skip_nonfinite=True)
        _set_grads(ctx, gen, [params])
        ours.step()  # states exist
        before = [p.detach().clone() for p in params]
        states_before = [v.clone() for p in params for v in ours.state[p].values()]
        errs = Errors()
        for bad in (math.inf, -math.inf, math.nan):
            _set_grads(ctx, gen, [params])
            params[-1].grad[params[-1].numel() // 2] = bad
            ours.step()
            if math.isfinite(ours.last_grad_norm.item()):
                errs.fail(f"grad {bad}: last_grad_norm {ours.last_grad_norm.item()} is finite")
            errs.add(exact_change(before, params, f"grad {bad}: param"))
            errs.add(exact_change(states_before, [v for p in params for v in ours.state[p].values()],
                                  f"grad {bad}: state"))
        _set_grads(ctx, gen, [params])
        ours.step()
        if all(torch.equal(p.detach(), b) for p, b in zip(params, before) if p.numel()):
            errs.fail("the finite step after the skipped ones did not move the params")
        yield ctx.row(f"{case.name} untouched", torch.float32, errs, "exact")


def _master_weights(ctx: Context) -> Iterator[Row]:
    """bf16/fp16 params with fp32 masters follow torch's fp32 trajectory; each param is its master rounded."""
    from mechgpu.optim._fused import MASTER_KEY

    gen = ctx.generator()
    for dtype in LOW_PRECISION:
        for case in FEATURED[::2]:
            ours_p = [ctx.randn(n, gen, dtype=dtype).requires_grad_() for n in ctx.sizes]
            ref_p = _leaves(ours_p, torch.float32)
            ours, ref = _optimizers(case, ours_p, ref_p, master_weights=True)
            masters, rounded = Errors(), Errors()
            for _ in range(ctx.steps):
                _set_grads(ctx, gen, [ours_p, ref_p])
                ours.step()
                ref.step()
                rounded.add(exact_change([ours.state[p][MASTER_KEY].to(dtype) for p in ours_p], ours_p, "param"))
            for i, (p, r) in enumerate(zip(ours_p, ref_p)):
                masters.add(measure(ours.state[p][MASTER_KEY], r, rtol=FP32_PARAM_RTOL, atol=FP32_PARAM_ATOL,
                                    dtype=torch.float32, what=f"master {i}"))
            yield ctx.row(f"{case.name} master vs torch fp32", dtype, masters, FP32_PARAM_TOL)
            yield ctx.row(f"{case.name} param=round(master)", dtype, rounded, "exact")


def _bf16_states(ctx: Context) -> Iterator[Row]:
    """state_dtype=bf16: from the same params and (bf16) states as torch, one step gives torch's
    fp32 params and its fp32 states rounded to bf16."""
    gen = ctx.generator()
    rtol = eps(torch.bfloat16)
    for case in FEATURED:
        ours_p = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
        ref_p = _leaves(ours_p)
        ours, ref = _optimizers(case, ours_p, ref_p, state_dtype=torch.bfloat16)
        params, states = Errors(), Errors()
        for step in range(ctx.steps):
            _set_grads(ctx, gen, [ours_p, ref_p])
            if step:
                with torch.no_grad():
                    for po, pr in zip(ours_p, ref_p):
                        pr.copy_(po)
                        for key, value in ref.state[pr].items():
                            if key != "step":
                                value.copy_(ours.state[po][key])
            ours.step()
            ref.step()
            for i, (a, b) in enumerate(zip(ours_p, ref_p)):
                params.add(measure(a, b, rtol=FP32_PARAM_RTOL, atol=FP32_PARAM_ATOL, dtype=torch.float32,
                                   what=f"param {i}"))
            states.add(state_errors(ours, ours_p, ref, ref_p, rtol=rtol, state_dtype=torch.bfloat16))
        yield ctx.row(f"{case.name} params", torch.float32, params, FP32_PARAM_TOL)
        yield ctx.row(f"{case.name} bf16 states", torch.bfloat16, states,
                      f"rtol {rtol:.2g}, atol {STATE_ATOL_SCALE:g} max|s|")


def _8bit_states(ctx: Context) -> Iterator[Row]:
    """state_dtype="8bit", each step against the float64 reference of the scheme from the same
    params and states (``oracles.quant8_reference_step``: torch's step in float64 between the code
    books' dequantize and quantize): params to fp32 tolerance, codes within a code of the
    reference's but at few ties, absmax (each block's max |state|) to the fp32 state tolerance (a
    block of one element whose update cancels has no better relative error); a tensor under
    ``MIN_8BIT_NUMEL`` keeps fp32 states, which follow torch's float64 step to that tolerance. Every featured
    configuration whose options allow 8-bit states (centered RMSprop's do not)."""
    from mechgpu.optim.quant8 import ABSMAX_SUFFIX, MIN_8BIT_NUMEL

    gen = ctx.generator()
    for case in FEATURED:
        if not SPECS[case.optimizer].takes_8bit(case.options):
            continue
        ours_p = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
        ours = _optimizers(case, ours_p, _leaves(ours_p), state_dtype="8bit")[0]
        params, absmax, fp32_states, pairs = Errors(), Errors(), Errors(), []
        for step in range(ctx.steps):
            _set_grads(ctx, gen, [ours_p])
            before = [(p.detach().clone(), p.grad.clone(), {k: v.clone() for k, v in ours.state[p].items()})
                      for p in ours_p]
            ours.step()
            for i, (p, (old, grad, state)) in enumerate(zip(ours_p, before)):
                if not p.numel():
                    continue
                quantized = p.numel() >= MIN_8BIT_NUMEL
                if step == 0 and quantized:  # the first step starts from torch's fresh state, quantized
                    state = quant8_initial_state(case.optimizer, case.options, old)
                ref = quant8_reference_step(case.optimizer, case.options, old, grad, state, case.lr,
                                            quantized=quantized)
                params.add(measure(p, ref["param"], rtol=FP32_PARAM_RTOL, atol=FP32_PARAM_ATOL,
                                   dtype=torch.float32, what=f"step {step} param {i}"))
                for key in (k for k in ref if k != "param" and not k.endswith(ABSMAX_SUFFIX)):
                    what = f"step {step} param {i} {key}"
                    if not quantized:
                        fp32_states.add(measure(ours.state[p][key], ref[key], rtol=STATE_RTOL,
                                                atol=STATE_ATOL_SCALE * float(ref[key].abs().max()),
                                                dtype=torch.float32, what=what))
                        continue
                    pairs.append((ours.state[p][key].clone(), ref[key], key in NONNEGATIVE_KEYS, what))
                    ref_absmax = ref[key + ABSMAX_SUFFIX]  # each block's max |state|: the fp32 state tolerance
                    absmax.add(measure(ours.state[p][key + ABSMAX_SUFFIX], ref_absmax, rtol=STATE_RTOL,
                                       atol=STATE_ATOL_SCALE * float(ref_absmax.abs().max()), dtype=torch.float32,
                                       what=what + ABSMAX_SUFFIX))
        if not pairs:
            params.fail(f"no param of at least {MIN_8BIT_NUMEL} elements among sizes {ctx.sizes}: nothing quantized")
        yield ctx.row(f"{case.name} params", torch.float32, params, FP32_PARAM_TOL)
        yield ctx.row(f"{case.name} 8-bit codes", "8bit", code_errors(pairs), QUANT8_TOL)
        yield ctx.row(f"{case.name} absmax", torch.float32, absmax, STATE_TOL)
        yield ctx.row(f"{case.name} fp32 states (< {MIN_8BIT_NUMEL})", torch.float32, fp32_states, STATE_TOL)


def _update_norm(ctx: Context) -> Iterator[Row]:
    """last_update_norm against the float64 norm of p_after - p_before over every param."""
    gen = ctx.generator()
    for case in FEATURED:
        params = [ctx.randn(n, gen).requires_grad_() for n in ctx.sizes]
        ours, _ = _optimizers(case, params, _leaves(params), groups=True, track_update_norm=True)
        errs = Errors()
        for _ in range(ctx.steps):
            _set_grads(ctx, gen, [params])
            before = [p.detach().double() for p in params]
            ours.step()
            expected = torch.linalg.vector_norm(torch.cat([(p.detach().double() - b).flatten()
                                                           for p, b in zip(params, before)]))
            errs.add(measure(ours.last_update_norm.double().reshape(()), expected, rtol=NORM_RTOL, atol=0.0,
                             what="last_update_norm"))
        yield ctx.row(f"{case.name} last_update_norm", torch.float32, errs, NORM_TOL)


def _stored_value(opt, p: torch.Tensor) -> torch.Tensor:
    """What a step carries forward, in float64: the fp32 master copy, else the param."""
    return opt.state.get(p, {}).get("master_param", p).detach().double().clone()


def _telemetry(ctx: Context) -> Iterator[Row]:
    """telemetry=True, per param group: ||p|| before the step and ||p_after - p_before|| (what the
    step stored: the param, or its fp32 master) against float64, and the non-finite grads counted
    (one NaN and one inf, in a step that then updates those params to NaN)."""
    gen = ctx.generator()
    for dtype, options in ((torch.float32, {}), (torch.bfloat16, {"master_weights": True})):
        for case in FEATURED:
            params = [ctx.randn(n, gen, dtype=dtype).requires_grad_() for n in ctx.sizes]
            ours, _ = _optimizers(case, params, _leaves(params), groups=True, telemetry=True, **options)
            norms, counts = Errors(), Errors()
            for step in range(ctx.steps):
                _set_grads(ctx, gen, [params])
                stored = functools.partial(_stored_value, ours)
                before = [stored(p) for p in params]
                poisoned = step == ctx.steps - 1 and max(ctx.sizes) > 1
                if poisoned:
                    big = max(range(len(params)), key=lambda i: params[i].numel())
                    params[big].grad[0], params[big].grad[-1] = math.nan, math.inf
                ours.step()
                for group, figures in zip(ours.param_groups, ours.last_telemetry):
                    index = [i for i, p in enumerate(params) if any(p is q for q in group["params"])]
                    bad = sum(int((~torch.isfinite(params[i].grad)).sum()) for i in index)
                    counts.add(measure(figures["nonfinite_grads"].double().reshape(()),
                                       torch.tensor(float(bad), dtype=torch.float64), rtol=0.0, atol=0.0,
                                       what="nonfinite_grads"))
                    if step == 0 and options:
                        continue  # the masters are made by the first step
                    param_sq = sum((before[i].square().sum() for i in index), torch.zeros((), dtype=torch.float64))
                    norms.add(measure(figures["param_norm"].double().reshape(()), param_sq.sqrt().cpu(),
                                      rtol=NORM_RTOL, atol=0.0, what="param_norm"))
                    if not bad:
                        update_sq = sum(((stored(params[i]) - before[i]).square().sum() for i in index),
                                        torch.zeros((), dtype=torch.float64))
                        norms.add(measure(figures["update_norm"].double().reshape(()), update_sq.sqrt().cpu(),
                                          rtol=NORM_RTOL, atol=0.0, what="update_norm"))
            tag = f"{case.name}{' bf16 masters' if options else ''}"
            yield ctx.row(f"{tag} param/update norms", torch.float32, norms, NORM_TOL)
            yield ctx.row(f"{tag} non-finite grads", torch.float32, counts, "exact")


def _grad_scaler(ctx: Context) -> Iterator[Row]:
    """torch.amp.GradScaler hands the kernel grad_scale and found_inf: the same steps are skipped
    as in torch's unfused path (unscale_, then no step on inf), and the params agree."""
    gen = ctx.generator()
    steps = ctx.steps + 2
    for case in FEATURED[::3]:
        start = [ctx.randn(n, gen) for n in ctx.sizes]
        targets = [ctx.randn(n, gen) for n in ctx.sizes]
        # the grads are scale * (p - t): a first scale 2 to 4 times too large overflows them for
        # certain on the first step and very likely on the second (half the scale), not after
        largest = max((s - t).abs().max().item() for s, t in zip(start, targets) if s.numel())
        init_scale = 2.0 ** (math.floor(math.log2(torch.finfo(torch.float32).max / largest)) + 2)
        ours_p, ref_p = _leaves(start), _leaves(start)
        ours, ref = _optimizers(case, ours_p, ref_p)
        skipped = {}
        errs = Errors()
        for who, opt, params in (("ours", ours, ours_p), ("torch", ref, ref_p)):
            scaler = torch.amp.GradScaler(ctx.device.type, init_scale=init_scale, growth_interval=2)
            skipped[who] = []
            for _ in range(steps):
                loss = sum(0.5 * ((p - t) ** 2).sum() for p, t in zip(params, targets))
                scaler.scale(loss).backward()
                scaler.step(opt)
                skipped[who].append(sum(v.item() for v in scaler._found_inf_per_device(opt).values()) > 0)
                scaler.update()
                opt.zero_grad()
        if skipped["ours"] != skipped["torch"]:
            errs.fail(f"skipped steps {skipped['ours']}, torch skipped {skipped['torch']}")
        if not any(skipped["ours"]) or all(skipped["ours"]):
            errs.fail(f"the scale should overflow on the first steps only; skipped {skipped['ours']}")
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            errs.add(measure(a, b, rtol=FP32_PARAM_RTOL, atol=FP32_PARAM_ATOL, dtype=torch.float32,
                             what=f"param {i}"))
        yield ctx.row(f"{case.name} params, {sum(skipped['ours'])} of {steps} skipped", torch.float32, errs,
                      FP32_PARAM_TOL)


CASES = (
    *(Case(f"optim.{c.name}", functools.partial(_trajectories, c)) for c in VARIANTS),
    Case("optim.max_grad_norm", _max_grad_norm),
    Case("optim.state_mutations", _state_mutations),
    Case("optim.skip_nonfinite", _skip_nonfinite),
    Case("optim.master_weights", _master_weights),
    Case("optim.state_dtype_bf16", _bf16_states),
    Case("optim.state_dtype_8bit", _8bit_states),
    Case("optim.track_update_norm", _update_norm),
    Case("optim.telemetry", _telemetry),
    Case("optim.grad_scaler", _grad_scaler),
)
