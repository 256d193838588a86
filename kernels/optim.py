"""Fused multi-tensor optimizer steps: Adam/AdamW, RMSprop, SGD and Adagrad, two launches a step each.

A step is two launches over a ``MultiTensorPlan`` (see ``multi_tensor.py``), whatever the
number of tensors: ``step_prologue_kernel`` counts each tensor's step and computes its
scalars (Adam's fp64 bias corrections) once per tensor, then ``optimizer_kernel``'s
programs stride over the plan's BLOCK-sized slices, reading each tensor's addresses from
the device-resident table. The math runs in fp32 and matches ``torch.optim`` to fp32
rounding. Params and grads are fp32, bf16 or fp16; states are fp32 or bf16. Hyper-
parameters are runtime arguments (or 0-d device tensors, read in the kernel), so a new
learning rate never recompiles. Constexprs select features that change the code.

Step counters live on the device: the prologue reads and increments them, so the step
never round-trips through the host, and the update kernel takes no atomics (but one per
program for the telemetry, which the update norm is part of).

Grad control, all read from device memory with no host sync (``StepControl``):
``grad_scale`` (GradScaler's scale: grads are unscaled in registers), ``found_inf``
(skip the step), and a clip coefficient from ``clip.py``'s norm kernel (grads are
multiplied by it in registers; with ``skip_nonfinite`` a non-finite norm skips the
step). A skipped step writes nothing and does not count.

Precision (``Precision``): with ``master`` the update reads and writes an fp32 master
copy and stores the param rounded to its dtype in the same pass (the param itself is not
read, so a change made to it outside the optimizer is overwritten); with ``stochastic``
bf16 params are rounded stochastically instead of to nearest.

Full blocks take an unmasked path; with ``ALIGNED`` the launcher promises that every
address in the table is 16-byte aligned, which lets the compiler emit 128-bit loads
and stores. A short tensor's block (or a tensor's last) is masked a whole vector at a time
(``multi_tensor.whole_vectors``), so only its last ``numel % VECTOR`` elements go one by one
(without TELEMETRY; with it a short block goes element by element).
Tensors at unaligned storage offsets go to a separate launch without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import TL_DTYPES, device_guard, mixed_width_warps, register_budget
from .multi_tensor import (
    PARTIALS_WIDTH,
    STRIDED_ROW,
    VECTOR,
    MultiTensorPlan,
    TableLayout,
    block_slice,
    rows,
    sum_partials,
    whole_vectors,
    zero_rows,
)
from .optim_spec import ADAGRAD, ADAM, FLAG_BITS, RMSPROP, SGD, SPECS, STATE_COLUMNS
from .quant8 import load_state8, store_state8
from .rounding import round_like

_STATE_COLUMNS = tuple(f"state{i}" for i in range(STATE_COLUMNS))
_ABSMAX_COLUMNS = tuple(f"absmax{i}" for i in range(STATE_COLUMNS))
#: One row per tensor: its param, grad, the rule's states (in its spec's ``states`` order;
#: 0 where its options make none), its fp32 step counter, its element count and its fp32 master;
#: then, for 8-bit states, each state's fp32 block maxima (``quant8.py``; the state column then
#: holds the uint8 codes). Codes and absmax are two tensors, so each is a state_dict entry of its
#: own (codes in the param's shape) and each is confirmed before a launch like any other state.
TABLE = TableLayout("param", "grad", *_STATE_COLUMNS, "step", "numel", "master", *_ABSMAX_COLUMNS)
_COL_PARAM, _COL_GRAD, _COL_STATE0, _COL_STATE1, _COL_STATE2, _COL_STEP, _COL_NUMEL, _COL_MASTER = TABLE.constexprs(
    "param", "grad", "state0", "state1", "state2", "step", "numel", "master")
_COL_ABSMAX0, _COL_ABSMAX1, _COL_ABSMAX2 = TABLE.constexprs(*_ABSMAX_COLUMNS)
_NCOL = tl.constexpr(TABLE.width)


def row_is_aligned(row: list[int]) -> bool:
    """Whether every address the kernel streams through (not the step counter) is 16-byte aligned,
    as the ``ALIGNED`` variant assumes; columns left 0 are."""
    return all(row[TABLE.index(c)] % 16 == 0 for c in ("param", "grad", *_STATE_COLUMNS, "master", *_ABSMAX_COLUMNS))


def table_row(*, param: int, grad: int, states: list[int], step: int, numel: int, master: int = 0,
              absmax: list[int] = ()) -> list[int]:
    """One optimizer table row; ``states`` are the addresses of the kernel's state columns in
    order (0 for one the kernel does not read), ``absmax`` those of 8-bit states' block maxima."""
    if len(states) > len(_STATE_COLUMNS) or len(absmax) > len(_STATE_COLUMNS):
        raise ValueError(f"at most {len(_STATE_COLUMNS)} state columns, got {len(states)} and {len(absmax)}")
    return TABLE.row(param=param, grad=grad, step=step, numel=numel, master=master,
                     **dict(zip(_STATE_COLUMNS, states)), **dict(zip(_ABSMAX_COLUMNS, absmax)))


# ----------------------------------------------------------------------------------
# shared plumbing
# ----------------------------------------------------------------------------------
@triton.jit
def _scalar(arg, IS_PTR: tl.constexpr):
    """A hyperparameter passed either as a runtime float or as a 0-d device tensor."""
    if IS_PTR:
        return tl.load(arg).to(tl.float32)
    else:
        return tl.cast(arg, tl.float32)


#: Squarings of _pow_int: enough for any int32 exponent
_POW_BITS = tl.constexpr(31)


@triton.jit
def _pow_int(base, n):
    """base ** n, elementwise, for an fp64 base and int32 n >= 0, by repeated squaring (no libdevice),
    over all 31 bits: a loop bounded by the largest n would reduce across the CTA, two barriers
    an iteration."""
    result = tl.full(n.shape, 1.0, tl.float64)
    base = tl.full(n.shape, 0.0, tl.float64) + base
    for _ in range(_POW_BITS):
        result = tl.where((n % 2) == 1, result * base, result)
        base = base * base
        n = n // 2
    return result


@triton.jit
def _table_ptr(row, COL: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(row + COL).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _grad_control(control_ptr, grad_scale_ptr, found_inf_ptr, CLIP: tl.constexpr,
                  SKIP_NONFINITE: tl.constexpr, UNSCALE: tl.constexpr, FOUND_INF: tl.constexpr):
    """(grad multiplier, skip) from device memory: 1/grad_scale * clip_coef; found_inf or a bad norm."""
    multiplier = tl.full((), 1.0, tl.float32)
    skip = tl.full((), 0, tl.int1)
    if UNSCALE:
        multiplier = 1.0 / tl.load(grad_scale_ptr).to(tl.float32)
    if CLIP:
        multiplier = multiplier * tl.load(control_ptr + 1)
    if SKIP_NONFINITE:
        norm = tl.load(control_ptr)
        skip = skip | (norm != norm) | (tl.abs(norm) == float("inf"))
    if FOUND_INF:
        skip = skip | (tl.load(found_inf_ptr) != 0)
    return multiplier, skip


@triton.jit
def _block_slice(table_ptr, blocks_ptr, item, skip, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """(tensor index, table row, element count, offsets, first offset, is-full-block) of block-table
    entry ``item``.

    A skipped step sees an element count of 0, so every access is masked off.
    """
    tensor_idx, row, numel, offs, start = block_slice(table_ptr, blocks_ptr, item, _NCOL, _COL_NUMEL, BLOCK, ALIGNED)
    numel = tl.where(skip, 0, numel)
    return tensor_idx, row, numel, offs, start, start + BLOCK <= numel


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula, which is exact at both ends."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _load_param_grad(param_ptr, master_ptr, grad_ptr, offs, mask, multiplier,
                     SCALE_GRAD: tl.constexpr, MASTER: tl.constexpr):
    """fp32 param (from the master copy if any) and fp32 grad (unscaled and clipped).

    With a master, the stored param is read too: where it no longer equals its master rounded
    to its dtype, it was written since the last step (a hook's clamp, ``load_state_dict``,
    steps with ``master_weights`` off), and its value seeds the master again, as torch's fp32
    step would honour the edit."""
    if MASTER:
        master = tl.load(master_ptr + offs, mask=mask)
        stored = tl.load(param_ptr + offs, mask=mask)
        p = tl.where(round_like(master, param_ptr) == stored, master, stored.to(tl.float32))
    else:
        p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    if SCALE_GRAD:
        g = g * multiplier
    return p, g


@triton.jit
def _stochastic_round_bf16(x, seed, offs):
    """fp32 -> bf16, rounding up with probability equal to the discarded fraction.

    bf16 is the top half of an fp32: add a uniform 16-bit integer to the low half, then
    truncate. inf and NaN stay as they are.
    """
    noise = tl.randint(seed, offs) & 0xFFFF
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + noise) & 0xFFFF0000).to(tl.float32, bitcast=True)
    rounded = tl.where(x != x, x, rounded)
    return rounded.to(tl.bfloat16)


@triton.jit
def _store_param(param_ptr, master_ptr, p, offs, mask, seed,
                 MASTER: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Store the updated p; returns, in fp32, the value that carries it to the next step (the
    master, or the param as rounded to its dtype)."""
    if MASTER:
        tl.store(master_ptr + offs, p, mask=mask)
    if STOCHASTIC:
        rounded = _stochastic_round_bf16(p, seed, offs)
    else:
        rounded = round_like(p, param_ptr)
    tl.store(param_ptr + offs, rounded, mask=mask)
    if MASTER:
        return p
    else:
        return rounded.to(tl.float32)


#: Per param group and step, the fp64 sums the kernel's telemetry adds (TELEMETRY): ||p||^2 before
#: the update, ||p_after - p||^2 (as stored: the master, or the param in its dtype), non-finite
#: grads, elements whose update the stored dtype lost (it kept p though the fp32 result p_new != p),
#: and elements with p_new != p.
TELEMETRY_FIELDS = TableLayout("param_sq", "update_sq", "nonfinite_grads", "lost_updates", "changed")
_T_PARAM_SQ, _T_UPDATE_SQ, _T_NONFINITE, _T_LOST, _T_CHANGED = TELEMETRY_FIELDS.constexprs(
    "param_sq", "update_sq", "nonfinite_grads", "lost_updates", "changed")
_NTELEMETRY = tl.constexpr(TELEMETRY_FIELDS.width)


@triton.jit
def _nonfinite(g, mask, ALIGNED: tl.constexpr, THREADS: tl.constexpr = 0):
    """Per row (``multi_tensor.rows``) of g, its non-finite elements (int32)."""
    bad = (g != g) | (tl.abs(g) == float("inf"))
    if mask is not None:
        bad = bad & mask
    return tl.sum(rows(bad.to(tl.int32), ALIGNED, THREADS), axis=1)


@triton.jit
def _loaded_telemetry(p_old, g, mask, ALIGNED: tl.constexpr, THREADS: tl.constexpr):
    """A block's (||p_old||^2, non-finite g) per row (``multi_tensor.rows``), fp64 and int32: taken as
    soon as p and g are loaded, so that g is not held through the update for them."""
    if mask is not None:
        p_old = tl.where(mask, p_old, 0.0)
    return (tl.sum(rows(p_old * p_old, ALIGNED, THREADS), axis=1).to(tl.float64),
            _nonfinite(g, mask, ALIGNED, THREADS))


#: Parts of a block an unaligned update with TELEMETRY updates one after the other, 2 elements a
#: thread each: beside p_old and the per-thread accumulators 8 at once spilled 116 to 826 B on sm_90a
#: (Adam, RMSprop; 2 parts still 8 to 44 B), 4 parts none, at 94 registers at most
_UNALIGNED_PARTS = tl.constexpr(4)


@triton.jit
def _add_stats(a, b):
    """The sum of two ``_block_telemetry`` tuples."""
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4]


@triton.jit
def _block_telemetry(loaded, p_old, p_new, stored, mask, ALIGNED: tl.constexpr, THREADS: tl.constexpr):
    """One block's (||p_old||^2, ||stored - p_old||^2, non-finite g, lost updates, changed) per row of
    ROW elements (``multi_tensor.rows``: within one thread, no barrier), the sums fp64 and the counts
    int32, the first and third ``loaded`` (``_loaded_telemetry``): the update norm is of what the step
    stored, the lost updates those whose p_new != p_old rounded back to p_old."""
    delta = stored - p_old
    changed = p_new != p_old
    lost = changed & (stored == p_old)
    if mask is not None:
        delta = tl.where(mask, delta, 0.0)
        changed = changed & mask
        lost = lost & mask
    return (loaded[0], tl.sum(rows(delta * delta, ALIGNED, THREADS), axis=1).to(tl.float64), loaded[1],
            tl.sum(rows(lost.to(tl.int32), ALIGNED, THREADS), axis=1),
            tl.sum(rows(changed.to(tl.int32), ALIGNED, THREADS), axis=1))


# Stochastic rounding's Philox seed: distinct primes, so (tensor, step) pairs map to distinct seeds.
_TENSOR_SEED_STRIDE = tl.constexpr(1000003)
_STEP_SEED_STRIDE = tl.constexpr(7919)


@triton.jit
def _rounding_seed(seed, tensor_idx, step):
    """A fresh Philox seed for each (tensor, step) pair."""
    return seed + tensor_idx * _TENSOR_SEED_STRIDE + step.to(tl.int32) * _STEP_SEED_STRIDE


# ----------------------------------------------------------------------------------
# the update rules: each formula once, on fp32 values, its states in the spec's column order
# ----------------------------------------------------------------------------------
_ADAM = tl.constexpr(ADAM)
_RMSPROP = tl.constexpr(RMSPROP)
_SGD = tl.constexpr(SGD)
_ADAGRAD = tl.constexpr(ADAGRAD)
# The rules' feature flags: bits of the FLAGS constexpr (optim_spec's ``Flag``s), tested as _NAME & FLAGS
_AMSGRAD, _DECOUPLED_WD, _CENTERED, _HAS_MOMENTUM, _NESTEROV, _MAXIMIZE = (
    tl.constexpr(FLAG_BITS[name]) for name in ("AMSGRAD", "DECOUPLED_WD", "CENTERED", "HAS_MOMENTUM", "NESTEROV",
                                               "MAXIMIZE"))


@triton.jit
def adam_update(p, g, m, v, vmax, lr, beta1_weight, beta2, one_minus_beta2, eps, weight_decay,
                step_size, bias_correction2_sqrt,
                FLAGS: tl.constexpr):
    """One Adam element update, fp32, in torch.optim's order of operations.

    g <- -g if maximize;  p <- p(1 - lr wd) (decoupled) or g <- g + wd p
    m <- lerp(m, g, 1 - beta1);  v <- beta2 v + (1 - beta2) g^2;  vmax <- max(vmax, v)
    p <- p - step_size * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps),
    step_size = lr / (1 - beta1^t)
    """
    if _MAXIMIZE & FLAGS:
        g = -g
    if weight_decay != 0.0:
        if _DECOUPLED_WD & FLAGS:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = _lerp(m, g, beta1_weight)
    v = v * beta2 + one_minus_beta2 * (g * g)
    if _AMSGRAD & FLAGS:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bias_correction2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v, vmax


@triton.jit
def rmsprop_update(p, g, sq, buf, g_avg, lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
                   FLAGS: tl.constexpr):
    """One RMSprop element update, fp32, in torch.optim's order of operations.

    g <- -g if maximize;  g <- g + wd p
    sq <- alpha sq + (1 - alpha) g^2;  g_avg <- lerp(g_avg, g, 1 - alpha) (centered)
    avg <- sqrt(sq - g_avg^2 if centered else sq) + eps
    buf <- momentum buf + g / avg;  p <- p - lr buf   (or p <- p - lr g / avg)
    """
    if _MAXIMIZE & FLAGS:
        g = -g
    if weight_decay != 0.0:
        g = g + weight_decay * p
    sq = sq * alpha + one_minus_alpha * (g * g)
    if _CENTERED & FLAGS:
        g_avg = _lerp(g_avg, g, one_minus_alpha)
        avg = tl.sqrt_rn(sq - g_avg * g_avg) + eps
    else:
        avg = tl.sqrt_rn(sq) + eps
    if _HAS_MOMENTUM & FLAGS:
        buf = buf * momentum + tl.div_rn(g, avg)
        p = p - lr * buf
    else:
        p = p - lr * tl.div_rn(g, avg)
    return p, sq, buf, g_avg


@triton.jit
def sgd_update(p, g, buf, first, lr, weight_decay, momentum, one_minus_dampening,
               FLAGS: tl.constexpr):
    """One SGD element update, fp32, in torch.optim's order of operations.

    g <- -g if maximize;  g <- g + wd p
    buf <- g on the first step, else momentum buf + (1 - dampening) g
    g <- g + momentum buf (nesterov) or buf;  p <- p - lr g
    """
    if _MAXIMIZE & FLAGS:
        g = -g
    if weight_decay != 0.0:
        g = g + weight_decay * p
    if _HAS_MOMENTUM & FLAGS:
        if first:
            buf = g
        else:
            buf = buf * momentum + one_minus_dampening * g
        if _NESTEROV & FLAGS:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    return p, buf


@triton.jit
def adagrad_update(p, g, state_sum, clr, eps, weight_decay, FLAGS: tl.constexpr):
    """One Adagrad element update, fp32, in torch.optim's (single-tensor) order of operations.

    g <- -g if maximize;  g <- g + wd p;  sum <- sum + g^2
    p <- p - clr * g / (sqrt(sum) + eps),  clr = lr / (1 + (t - 1) lr_decay)
    """
    if _MAXIMIZE & FLAGS:
        g = -g
    if weight_decay != 0.0:
        g = g + weight_decay * p
    state_sum = state_sum + g * g
    p = p - clr * tl.div_rn(g, tl.sqrt_rn(state_sum) + eps)
    return p, state_sum


# ----------------------------------------------------------------------------------
# the one multi-tensor optimizer kernel
# ----------------------------------------------------------------------------------
#: A state column's KIND (the kernel's STATE0..2): unused, stored in STATE_DTYPE, or 8-bit codes
#: with block maxima (``quant8.py``), signed or of a non-negative state's square root
STATE_UNUSED, STATE_FLOAT, STATE_SIGNED8, STATE_UNSIGNED8 = range(4)
_FLOAT, _SIGNED8, _UNSIGNED8 = tl.constexpr(STATE_FLOAT), tl.constexpr(STATE_SIGNED8), tl.constexpr(STATE_UNSIGNED8)


@triton.jit
def _load_state(ptr, absmax_ptr, offs, mask, KIND: tl.constexpr, unused):
    """A state column as fp32 where the rule's options use it; else ``unused``, never stored."""
    if KIND == _FLOAT:
        return tl.load(ptr + offs, mask=mask).to(tl.float32)
    elif KIND == _SIGNED8:
        return load_state8(ptr, absmax_ptr, offs, mask, False)
    elif KIND == _UNSIGNED8:
        return load_state8(ptr, absmax_ptr, offs, mask, True)
    else:
        return unused


@triton.jit
def _store_state(ptr, absmax_ptr, value, offs, mask, KIND: tl.constexpr):
    if KIND == _FLOAT:
        tl.store(ptr + offs, round_like(value, ptr), mask=mask)
    elif KIND == _SIGNED8:
        store_state8(ptr, absmax_ptr, value, offs, mask, False)
    elif KIND == _UNSIGNED8:
        store_state8(ptr, absmax_ptr, value, offs, mask, True)


@triton.jit
def _rule_block(ptrs, offs, mask, multiplier, seed, hypers, scalars,
                RULE: tl.constexpr, STATE0: tl.constexpr, STATE1: tl.constexpr, STATE2: tl.constexpr,
                FLAGS: tl.constexpr, SCALE_GRAD: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
                TELEMETRY: tl.constexpr, ALIGNED: tl.constexpr, THREADS: tl.constexpr = 0):
    """One block: load p, g and the state columns the launch uses (STATE0..2, from the spec: each
    a ``STATE_*`` kind), update by RULE, store. ``ptrs`` is (param, grad, state0, state1, state2,
    master, absmax0, absmax1, absmax2), ``hypers``
    the kernel's runtime hyperparameters and ``scalars`` the tensor's (step size, sqrt(1 -
    beta2^t), first step). Returns the block's ``_block_telemetry`` with TELEMETRY, else zeros."""
    param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, absmax0_ptr, absmax1_ptr, absmax2_ptr = ptrs
    lr, beta1_weight, beta2, one_minus_beta2, eps, weight_decay, momentum, one_minus_dampening = hypers
    p, g = _load_param_grad(param_ptr, master_ptr, grad_ptr, offs, mask, multiplier, SCALE_GRAD, MASTER)
    p_old = p
    loaded = (0.0, 0)
    if TELEMETRY:
        loaded = _loaded_telemetry(p_old, g, mask, ALIGNED, THREADS)
    s0 = _load_state(state0_ptr, absmax0_ptr, offs, mask, STATE0, g)
    s1 = _load_state(state1_ptr, absmax1_ptr, offs, mask, STATE1, g)
    s2 = _load_state(state2_ptr, absmax2_ptr, offs, mask, STATE2, g)
    # the tensor's scalars from the step prologue, read after the data loads are issued
    first = tl.load(scalars + _SCALAR_STEP) == 0.0  # SGD's first step sets the buffer to the grad
    step_size = tl.load(scalars + _SCALAR_STEP_SIZE)
    bias_correction2_sqrt = tl.load(scalars + _SCALAR_BC2_SQRT)
    if RULE == _ADAM:
        p, s0, s1, s2 = adam_update(p, g, m=s0, v=s1, vmax=s2, lr=lr, beta1_weight=beta1_weight, beta2=beta2,
                                    one_minus_beta2=one_minus_beta2, eps=eps, weight_decay=weight_decay,
                                    step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt,
                                    FLAGS=FLAGS)
    elif RULE == _RMSPROP:
        p, s0, s1, s2 = rmsprop_update(p, g, sq=s0, buf=s1, g_avg=s2, lr=lr, alpha=beta2,
                                       one_minus_alpha=one_minus_beta2, eps=eps, weight_decay=weight_decay,
                                       momentum=momentum, FLAGS=FLAGS)
    elif RULE == _SGD:
        p, s0 = sgd_update(p, g, buf=s0, first=first, lr=lr, weight_decay=weight_decay, momentum=momentum,
                           one_minus_dampening=one_minus_dampening, FLAGS=FLAGS)
    elif RULE == _ADAGRAD:
        p, s0 = adagrad_update(p, g, state_sum=s0, clr=step_size, eps=eps, weight_decay=weight_decay,
                               FLAGS=FLAGS)
    else:
        tl.static_assert(False, "optimizer_kernel: unknown RULE")
    _store_state(state0_ptr, absmax0_ptr, s0, offs, mask, STATE0)
    _store_state(state1_ptr, absmax1_ptr, s1, offs, mask, STATE1)
    _store_state(state2_ptr, absmax2_ptr, s2, offs, mask, STATE2)
    stored = _store_param(param_ptr, master_ptr, p, offs, mask, seed, MASTER, STOCHASTIC)
    stats = (0.0, 0.0, 0, 0, 0)
    if TELEMETRY:
        stats = _block_telemetry(loaded, p_old, p, stored, mask, ALIGNED, THREADS)
    return stats


@triton.jit
def _state_ptr(row, COL: tl.constexpr, USED: tl.constexpr, fallback, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A state column's pointer where the rule reads it; else ``fallback``, which is never dereferenced."""
    if USED:
        return _table_ptr(row, COL, DTYPE, ALIGNED)
    else:
        return fallback.to(tl.pointer_type(DTYPE))


#: Per tensor, the fp32 scalars the step prologue writes for the update kernel: the step
#: before and after this one, and Adam's step size lr / (1 - beta1^t) and sqrt(1 - beta2^t).
STEP_SCALARS = TableLayout("step", "new_step", "step_size", "bias_correction2_sqrt")
_SCALAR_STEP, _SCALAR_NEW_STEP, _SCALAR_STEP_SIZE, _SCALAR_BC2_SQRT = STEP_SCALARS.constexprs(
    "step", "new_step", "step_size", "bias_correction2_sqrt")
_NSCALARS = tl.constexpr(STEP_SCALARS.width)
PROLOGUE_TENSORS, PROLOGUE_WARPS = 128, 4  # tensors per program of the prologue, one per thread


@triton.jit
def step_prologue_kernel(table_ptr, scalars_ptr, done_ptr, control_ptr, found_inf_ptr, lr, beta1, beta2,
                         one_minus_beta1, one_minus_beta2, lr_decay, num_tensors,
                         RULE: tl.constexpr, LR_IS_PTR: tl.constexpr, BETAS_ARE_PTRS: tl.constexpr,
                         SKIP_NONFINITE: tl.constexpr, FOUND_INF: tl.constexpr, TENSORS: tl.constexpr):
    """Once per tensor and step, before the update: count the step, and write its scalars.

    step <- step + 1 unless the step is skipped (found_inf, or a non-finite clip norm); then
    scalars[t] = (step before, step after, step size, sqrt(1 - beta2^t)) with t the step after:
    Adam's step size lr / (1 - beta1^t), Adagrad's lr / (1 + (t - 1) lr_decay), else lr,
    computed in fp64 as torch.optim does in Python.
    The update kernel reads these and runs no fp64. SGD's step column holds a private
    count of steps (torch's SGD keeps none); at 0 its momentum buffer is set to the grad.
    Program 0 also zeroes the update kernel's done-counter, in the stream before that kernel runs,
    so a counter left non-zero (an aborted launch) cannot spoil this step's telemetry.
    Bytes: ``mechgpu.traffic.STEP_PROLOGUE_BYTES_PER_TENSOR`` per tensor, none per element.
    """
    _, skip = _grad_control(control_ptr, control_ptr, found_inf_ptr, False, SKIP_NONFINITE, False, FOUND_INF)
    if tl.program_id(0) == 0:
        tl.store(done_ptr, 0)
    tensor_idx = tl.program_id(0) * TENSORS + tl.arange(0, TENSORS)
    mask = tensor_idx < num_tensors
    rows = table_ptr + tensor_idx.to(tl.int64) * _NCOL
    step_ptrs = tl.load(rows + _COL_STEP, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptrs, mask=mask, other=0.0)
    new_step = tl.where(skip, step, step + 1.0)
    tl.store(step_ptrs, new_step, mask=mask)  # unchanged when skipped
    lr = _scalar(lr, LR_IS_PTR)
    step_size = tl.zeros_like(step) + lr
    bias_correction2_sqrt = tl.full(step.shape, 1.0, tl.float32)
    if RULE == _ADAM:
        if BETAS_ARE_PTRS:
            beta1_64 = tl.load(beta1).to(tl.float32).to(tl.float64)
            beta2_64 = tl.load(beta2).to(tl.float32).to(tl.float64)
        else:
            # 1 - beta arrives rounded to fp32 with full relative precision, so rebuilding
            # beta from it in fp64 keeps 1 - beta^t accurate even for beta2 = 0.9999.
            beta1_64 = 1.0 - tl.cast(one_minus_beta1, tl.float64)
            beta2_64 = 1.0 - tl.cast(one_minus_beta2, tl.float64)
        t = new_step.to(tl.int32)
        step_size = (lr.to(tl.float64) / (1.0 - _pow_int(beta1_64, t))).to(tl.float32)
        bias_correction2_sqrt = tl.sqrt(1.0 - _pow_int(beta2_64, t)).to(tl.float32)
    elif RULE == _ADAGRAD:
        step_size = (lr.to(tl.float64) / (1.0 + (new_step.to(tl.float64) - 1.0) * lr_decay)).to(tl.float32)
    out = scalars_ptr + tensor_idx * _NSCALARS
    tl.store(out + _SCALAR_STEP, step, mask=mask)
    tl.store(out + _SCALAR_NEW_STEP, new_step, mask=mask)
    tl.store(out + _SCALAR_STEP_SIZE, step_size, mask=mask)
    tl.store(out + _SCALAR_BC2_SQRT, bias_correction2_sqrt, mask=mask)


@triton.jit
def optimizer_kernel(table_ptr, blocks_ptr, scalars_ptr, done_ptr, partials_ptr, control_ptr, grad_scale_ptr,
                     found_inf_ptr, telemetry_ptr, seed, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                     weight_decay, momentum, one_minus_dampening, num_blocks,
                     RULE: tl.constexpr, STATE0: tl.constexpr, STATE1: tl.constexpr, STATE2: tl.constexpr,
                     PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                     LR_IS_PTR: tl.constexpr, BETAS_ARE_PTRS: tl.constexpr, WD_IS_PTR: tl.constexpr,
                     FLAGS: tl.constexpr,
                     CLIP: tl.constexpr, SKIP_NONFINITE: tl.constexpr, UNSCALE: tl.constexpr,
                     FOUND_INF: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
                     TELEMETRY: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One optimizer step over every tensor of a table; ``RULE`` picks the update formula, and
    STATE0..2 say which state columns the rule's options use (``optim_spec``: its ``states``).

    Runs after ``step_prologue_kernel``, whose per-tensor scalars it reads. Grid-stride:
    program pid updates block-table entries pid, pid + P, ... (P programs), so its prologue
    (grad control, hyperparameters) is paid once per program, and each block's first
    instructions are table reads and then the data loads.

    Hyperparameters: ``beta2``/``one_minus_beta2`` are the decay of the squared-grad average,
    Adam's beta2 and RMSprop's alpha; ``beta1``/``one_minus_beta1`` Adam's first-moment decay;
    ``momentum`` and ``one_minus_dampening`` RMSprop's and SGD's.

    Telemetry (TELEMETRY), from the values the update has in registers, no extra pass: each
    thread adds its rows of each block's ``_block_telemetry`` to its own accumulators (fp64 sums,
    int32 counts) and the program reduces them across the CTA once, after the block loop (no
    barrier per block); it stores one row of partials; the
    last program to finish (one atomic per program, none per block) adds their sums to the
    group's ``telemetry`` row (``TELEMETRY_FIELDS``); the prologue zeroed the done-counter. A skipped
    step updates nothing, but its programs still read the grads to count the non-finite ones.

    Bytes per element: ``mechgpu.traffic.optimizer_step_bytes`` (p and g read, p written, each
    state the rule and options use read and written; an fp32 master read and written instead
    of reading p), which tests/test_traffic.py checks against this kernel's loads and stores.
    """
    multiplier, skip = _grad_control(control_ptr, grad_scale_ptr, found_inf_ptr,
                                     CLIP, SKIP_NONFINITE, UNSCALE, FOUND_INF)
    lr = _scalar(lr, LR_IS_PTR)
    weight_decay = _scalar(weight_decay, WD_IS_PTR)
    beta2 = _scalar(beta2, BETAS_ARE_PTRS)
    beta1_weight = one_minus_beta1
    if BETAS_ARE_PTRS:
        beta1_weight = 1.0 - tl.load(beta1).to(tl.float32)
        one_minus_beta2 = 1.0 - beta2
    # per thread and row (multi_tensor.rows), across the program's blocks: reduced once after the loop
    param_sq = zero_rows(BLOCK, ALIGNED, tl.float64)
    update_sq = zero_rows(BLOCK, ALIGNED, tl.float64)
    nonfinite = zero_rows(BLOCK, ALIGNED, tl.int32)
    lost = zero_rows(BLOCK, ALIGNED, tl.int32)
    changed = zero_rows(BLOCK, ALIGNED, tl.int32)
    if TELEMETRY:
        if skip:  # nothing to update; count the grads that made the step skip
            for item in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
                _, row, numel, offs, _ = block_slice(table_ptr, blocks_ptr, item, _NCOL, _COL_NUMEL, BLOCK, ALIGNED)
                valid = offs < numel
                g = tl.load(_table_ptr(row, _COL_GRAD, PARAM_DTYPE, ALIGNED) + offs, mask=valid, other=0.0)
                nonfinite += _nonfinite(g.to(tl.float32), valid, ALIGNED)
    for item in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
        tensor_idx, row, numel, offs, start, full = _block_slice(table_ptr, blocks_ptr, item, skip, BLOCK, ALIGNED)
        param_ptr = _table_ptr(row, _COL_PARAM, PARAM_DTYPE, ALIGNED)
        grad_ptr = _table_ptr(row, _COL_GRAD, PARAM_DTYPE, ALIGNED)
        state0_ptr = _state_ptr(row, _COL_STATE0, STATE0, grad_ptr, STATE_DTYPE, ALIGNED)
        state1_ptr = _state_ptr(row, _COL_STATE1, STATE1, grad_ptr, STATE_DTYPE, ALIGNED)
        state2_ptr = _state_ptr(row, _COL_STATE2, STATE2, grad_ptr, STATE_DTYPE, ALIGNED)
        master_ptr = _state_ptr(row, _COL_MASTER, MASTER, grad_ptr, tl.float32, ALIGNED)
        absmax0_ptr = _state_ptr(row, _COL_ABSMAX0, STATE0 >= _SIGNED8, grad_ptr, tl.float32, ALIGNED)
        absmax1_ptr = _state_ptr(row, _COL_ABSMAX1, STATE1 >= _SIGNED8, grad_ptr, tl.float32, ALIGNED)
        absmax2_ptr = _state_ptr(row, _COL_ABSMAX2, STATE2 >= _SIGNED8, grad_ptr, tl.float32, ALIGNED)
        tensor_scalars = scalars_ptr + tensor_idx * _NSCALARS
        block_seed = _rounding_seed(seed, tensor_idx, tl.load(tensor_scalars + _SCALAR_NEW_STEP))
        ptrs = (param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, absmax0_ptr, absmax1_ptr,
                absmax2_ptr)
        hypers = (lr, beta1_weight, beta2, one_minus_beta2, eps, weight_decay, momentum, one_minus_dampening)
        if TELEMETRY and not ALIGNED:
            # in _UNALIGNED_PARTS parts, masked, one after the other; each thread keeps its row
            # (multi_tensor.rows with THREADS), so no shuffle or barrier
            part = start + tl.arange(0, BLOCK // _UNALIGNED_PARTS)
            stats = _rule_block(ptrs, part, part < numel, multiplier, block_seed, hypers, tensor_scalars,
                                RULE=RULE, STATE0=STATE0, STATE1=STATE1, STATE2=STATE2, FLAGS=FLAGS,
                                SCALE_GRAD=CLIP or UNSCALE, MASTER=MASTER, STOCHASTIC=STOCHASTIC,
                                TELEMETRY=TELEMETRY, ALIGNED=ALIGNED, THREADS=BLOCK // STRIDED_ROW)
            for _ in tl.static_range(1, _UNALIGNED_PARTS):
                part += BLOCK // _UNALIGNED_PARTS
                stats = _add_stats(stats, _rule_block(
                    ptrs, part, part < numel, multiplier, block_seed, hypers, tensor_scalars,
                    RULE=RULE, STATE0=STATE0, STATE1=STATE1, STATE2=STATE2, FLAGS=FLAGS,
                    SCALE_GRAD=CLIP or UNSCALE, MASTER=MASTER, STOCHASTIC=STOCHASTIC,
                    TELEMETRY=TELEMETRY, ALIGNED=ALIGNED, THREADS=BLOCK // STRIDED_ROW))
        elif full:  # unmasked, so full vectors
            stats = _rule_block(ptrs, offs, None, multiplier, block_seed, hypers, tensor_scalars, RULE=RULE,
                                STATE0=STATE0, STATE1=STATE1, STATE2=STATE2, FLAGS=FLAGS,
                                SCALE_GRAD=CLIP or UNSCALE, MASTER=MASTER, STOCHASTIC=STOCHASTIC,
                                TELEMETRY=TELEMETRY, ALIGNED=ALIGNED)
        elif ALIGNED and not TELEMETRY and STATE0 < _SIGNED8 and STATE1 < _SIGNED8 and STATE2 < _SIGNED8:
            # a short tensor or a last block: first its last numel % VECTOR elements one by one, VECTOR
            # lanes wide, then its whole vectors masked a vector at a time (128-bit). (8-bit states take
            # the masked path below: a quant block's codes share one absmax, so it is encoded in one
            # call, never split between the tail and the vectors.) (The other order
            # kept the row's pointers live through the vectors' update: fp32 Adam 80 registers, not 64.
            # With TELEMETRY the tail's registers took the 16-warp fp16 + master variants past their
            # budget of 64, so those keep the element-by-element path below.)
            vectors = whole_vectors(numel)
            if vectors < numel:
                tail_offs = vectors + tl.arange(0, VECTOR)
                _rule_block(ptrs, tail_offs, tail_offs < numel, multiplier, block_seed, hypers, tensor_scalars,
                            RULE=RULE, STATE0=STATE0, STATE1=STATE1, STATE2=STATE2, FLAGS=FLAGS,
                            SCALE_GRAD=CLIP or UNSCALE, MASTER=MASTER, STOCHASTIC=STOCHASTIC,
                            TELEMETRY=TELEMETRY, ALIGNED=ALIGNED)
            stats = _rule_block(ptrs, offs, offs < vectors, multiplier, block_seed, hypers, tensor_scalars,
                                RULE=RULE, STATE0=STATE0, STATE1=STATE1, STATE2=STATE2, FLAGS=FLAGS,
                                SCALE_GRAD=CLIP or UNSCALE, MASTER=MASTER, STOCHASTIC=STOCHASTIC,
                                TELEMETRY=TELEMETRY, ALIGNED=ALIGNED)
        else:
            stats = _rule_block(ptrs, offs, offs < numel, multiplier, block_seed, hypers, tensor_scalars, RULE=RULE,
                                STATE0=STATE0, STATE1=STATE1, STATE2=STATE2, FLAGS=FLAGS,
                                SCALE_GRAD=CLIP or UNSCALE, MASTER=MASTER, STOCHASTIC=STOCHASTIC,
                                TELEMETRY=TELEMETRY, ALIGNED=ALIGNED)
        if TELEMETRY:
            param_sq += stats[0]
            update_sq += stats[1]
            nonfinite += stats[2]
            lost += stats[3]
            changed += stats[4]
    if TELEMETRY:
        mine = partials_ptr + tl.program_id(0) * _NTELEMETRY
        tl.store(mine + _T_PARAM_SQ, tl.sum(param_sq, axis=0))
        tl.store(mine + _T_UPDATE_SQ, tl.sum(update_sq, axis=0))
        tl.store(mine + _T_NONFINITE, tl.sum(nonfinite.to(tl.float64), axis=0))
        tl.store(mine + _T_LOST, tl.sum(lost.to(tl.float64), axis=0))
        tl.store(mine + _T_CHANGED, tl.sum(changed.to(tl.float64), axis=0))
        finished = tl.atomic_add(done_ptr, 1)  # acq_rel: the partials stored before it are visible after it
        if finished == tl.num_programs(0) - 1:
            for field in tl.static_range(_NTELEMETRY):
                total = sum_partials(partials_ptr + field, tl.num_programs(0), _NTELEMETRY, PARTIALS_WIDTH)
                tl.store(telemetry_ptr + field, tl.load(telemetry_ptr + field) + total)


# ----------------------------------------------------------------------------------
# launchers: plain Python, torch tensors in
# ----------------------------------------------------------------------------------


@dataclass
class StepControl:
    """Per-step controls of the step (all optional): device tensors the kernel reads, or flags.

    clip: fp32 ``[2]`` tensor ``(total_norm, clip_coef)`` written by ``clip.py``'s norm kernel.
    skip_nonfinite: skip the step when ``clip[0]`` is inf or NaN.
    telemetry: when given, an fp64 ``[TELEMETRY_FIELDS.width]`` row the step adds its telemetry to
    (``TELEMETRY_FIELDS``), summed by the kernel from values it has in registers.
    grad_scale, found_inf: GradScaler's tensors (grads are divided by grad_scale; a
    nonzero found_inf skips the step).
    """

    clip: torch.Tensor | None = None
    skip_nonfinite: bool = False
    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    telemetry: torch.Tensor | None = None


@dataclass(frozen=True)
class Precision:
    """How params and states are stored: state dtype (torch.uint8: 8-bit codes with block maxima,
    ``quant8.py``), fp32 master copy, stochastic rounding."""

    state_dtype: torch.dtype = torch.float32
    master: bool = False
    stochastic: bool = False
    seed: int = 0


#: The largest block of a launch with 8-bit states: they run 4 elements per thread (``kernel_arguments``),
#: so 1,024 elements are 8 warps, whose 128-register budget holds the codec beside clipping and
#: telemetry without spills (16 warps' 64 did not)
QUANTIZED_MAX_BLOCK = 1024
#: the dtypes a launch's states may have: the float ones, or uint8 for 8-bit codes
_STATE_TL_DTYPES = {**TL_DTYPES, torch.uint8: tl.uint8}


def state_kinds(rule: int, used: tuple[bool, ...], state_dtype: torch.dtype) -> tuple[int, ...]:
    """The kernel's STATE0..2 (``STATE_*`` kinds) for the state columns ``used`` of ``rule``: with uint8
    ``state_dtype``, each state is 8-bit, unsigned where its spec's ``State`` is non-negative."""
    if state_dtype != torch.uint8:
        return tuple(STATE_FLOAT if u else STATE_UNUSED for u in used)
    states = next(spec for spec in SPECS.values() if spec.rule == rule).states
    return tuple(STATE_UNUSED if not u else STATE_UNSIGNED8 if states[i].nonnegative else STATE_SIGNED8
                 for i, u in enumerate(used))


def _hyper(value):
    """A float stays a runtime scalar; a 0-d tensor is passed by address."""
    if isinstance(value, torch.Tensor):
        return value, True
    return float(value), False


def step_values(plan: MultiTensorPlan, *, lr, weight_decay=0.0, beta1=0.0, beta2=0.0, eps: float = 0.0,
                momentum: float = 0.0, dampening: float = 0.0, lr_decay: float = 0.0,
                control: StepControl | None = None) -> tuple[dict, tuple[bool, bool, bool]]:
    """The kernel arguments a step may change without changing the compiled kernel, by name (the
    hyperparameters and the control tensors), and (LR_IS_PTR, WD_IS_PTR, BETAS_ARE_PTRS)."""
    control = control or StepControl()
    spare = plan.table  # any device pointer, for arguments a variant never reads
    lr, lr_is_ptr = _hyper(lr)
    weight_decay, wd_is_ptr = _hyper(weight_decay)
    betas_are_ptrs = isinstance(beta1, torch.Tensor) or isinstance(beta2, torch.Tensor)
    if betas_are_ptrs:  # both read from device memory; a float beside a tensor becomes a 0-d tensor
        beta1, beta2 = (b if isinstance(b, torch.Tensor) else torch.full((), float(b), device=plan.device)
                        for b in (beta1, beta2))
        one_minus_beta1 = one_minus_beta2 = 0.0
    else:
        # 1 - beta in double on the host, as torch.optim computes it
        beta1, beta2 = float(beta1), float(beta2)
        one_minus_beta1, one_minus_beta2 = 1.0 - beta1, 1.0 - beta2
    values = dict(
        lr=lr, beta1=beta1, beta2=beta2, one_minus_beta1=one_minus_beta1, one_minus_beta2=one_minus_beta2,
        weight_decay=weight_decay, eps=float(eps), momentum=float(momentum),
        one_minus_dampening=1.0 - float(dampening), lr_decay=float(lr_decay),
        control_ptr=control.clip if control.clip is not None else spare,
        grad_scale_ptr=control.grad_scale if control.grad_scale is not None else spare,
        found_inf_ptr=control.found_inf if control.found_inf is not None else spare,
        telemetry_ptr=control.telemetry if control.telemetry is not None else spare,
    )
    return values, (lr_is_ptr, wd_is_ptr, betas_are_ptrs)


def kernel_arguments(plan: MultiTensorPlan, param_dtype: torch.dtype, rule: int, *, aligned: bool,
                     states: tuple[bool, ...], flags: dict[str, bool], lr, weight_decay=0.0, beta1=0.0, beta2=0.0,
                     eps: float = 0.0, momentum: float = 0.0, dampening: float = 0.0, lr_decay: float = 0.0,
                     control: StepControl | None = None, precision: Precision | None = None) -> tuple[dict, dict]:
    """The keyword arguments, launch options included, of one step's prologue and update kernel.

    ``states`` says which state columns the rule's options use and ``flags`` sets its feature
    flags (``optim_spec``: ``state_keys`` and ``kernel_flags``; the flags not given are off), passed
    as the bits of the one FLAGS constexpr.
    ``lr``, ``weight_decay`` and the betas may be 0-d device tensors (read in the kernel).
    """
    unknown = set(flags) - set(FLAG_BITS)
    if unknown or len(states) > STATE_COLUMNS:
        raise KeyError(f"optimizer_kernel has no flag {sorted(unknown)} (its flags: {', '.join(FLAG_BITS)}) or "
                       f"more than {STATE_COLUMNS} states ({len(states)})")
    used = (*states, *(False,) * (STATE_COLUMNS - len(states)))
    control = control or StepControl()
    precision = precision or Precision()
    kinds = state_kinds(rule, used, precision.state_dtype)
    quantized = any(k in (STATE_SIGNED8, STATE_UNSIGNED8) for k in kinds)
    # bf16/fp16 params beside fp32 states or masters, with vector access: 4 elements per thread
    # (_launch.mixed_width_warps); unaligned tensors are accessed element by element anyway.
    # 8-bit states too, beside any params: their uint8 codes and the fp32 block maxima then share
    # one layout with every stream (8 per thread beside 16-bit params, the first tried, staged the
    # maxima through shared memory with 12 barriers per block: 110 registers, not 70, on sm_90a),
    # and a quant block (quant8.QUANT_BLOCK) lies within one warp, so its max needs no shared memory.
    fp32_streams = precision.master or (precision.state_dtype == torch.float32 and any(used))
    mixed = aligned and ((param_dtype != torch.float32 and fp32_streams)
                         or quantized)
    warps = mixed_width_warps(plan.block) if mixed else plan.num_warps
    step, (lr_is_ptr, wd_is_ptr, betas_are_ptrs) = step_values(
        plan, lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, momentum=momentum,
        dampening=dampening, lr_decay=lr_decay, control=control)
    num_tensors = len(plan.numels)
    scalars = plan.workspace("step_scalars", (num_tensors, STEP_SCALARS.width), torch.float32)
    partials = plan.workspace("telemetry_partials", (plan.grid, TELEMETRY_FIELDS.width), torch.float64)
    skip_nonfinite = control.skip_nonfinite and control.clip is not None
    hypers = {k: step[k] for k in ("lr", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2")}
    prologue = dict(
        table_ptr=plan.table, scalars_ptr=scalars, done_ptr=plan.done, control_ptr=step["control_ptr"],
        found_inf_ptr=step["found_inf_ptr"], **hypers,
        lr_decay=step["lr_decay"], num_tensors=num_tensors, RULE=rule, LR_IS_PTR=lr_is_ptr,
        BETAS_ARE_PTRS=betas_are_ptrs, SKIP_NONFINITE=skip_nonfinite, FOUND_INF=control.found_inf is not None,
        TENSORS=PROLOGUE_TENSORS, num_warps=PROLOGUE_WARPS,
    )
    update = dict(
        table_ptr=plan.table, blocks_ptr=plan.blocks, scalars_ptr=scalars, done_ptr=plan.done,
        partials_ptr=partials, control_ptr=step["control_ptr"], grad_scale_ptr=step["grad_scale_ptr"],
        found_inf_ptr=step["found_inf_ptr"], telemetry_ptr=step["telemetry_ptr"], seed=precision.seed,
        **hypers, eps=step["eps"], weight_decay=step["weight_decay"], momentum=step["momentum"],
        one_minus_dampening=step["one_minus_dampening"], num_blocks=plan.num_blocks,
        RULE=rule, **dict(zip(("STATE0", "STATE1", "STATE2"), kinds, strict=True)),
        PARAM_DTYPE=TL_DTYPES[param_dtype], STATE_DTYPE=_STATE_TL_DTYPES[precision.state_dtype],
        LR_IS_PTR=lr_is_ptr, BETAS_ARE_PTRS=betas_are_ptrs, WD_IS_PTR=wd_is_ptr,
        FLAGS=sum(FLAG_BITS[name] for name, on in flags.items() if on),
        CLIP=control.clip is not None, SKIP_NONFINITE=skip_nonfinite,
        UNSCALE=control.grad_scale is not None, FOUND_INF=control.found_inf is not None,
        MASTER=precision.master, STOCHASTIC=precision.stochastic, TELEMETRY=control.telemetry is not None,
        ALIGNED=aligned, BLOCK=plan.block, num_warps=warps, maxnreg=register_budget(warps),
    )
    return prologue, update


#: kernel_arguments' arguments that step_values reads
_STEP_VALUE_ARGUMENTS = frozenset(("lr", "weight_decay", "beta1", "beta2", "eps", "momentum", "dampening", "lr_decay",
                                   "control"))


def _frozen(value):
    """A launch argument as part of a dict key (a Precision is one: frozen)."""
    return tuple(value.items()) if type(value) is dict else value


def launch(plan: MultiTensorPlan, param_dtype: torch.dtype, rule: int, **arguments) -> None:
    """One step of ``rule`` over every tensor in ``plan``: the prologue and the update, every
    argument by name (``kernel_arguments`` says which).

    The first step of each variant (the arguments other than ``step_values``', and the kinds of
    those) goes through ``kernel_arguments`` and triton's launch, and binds both kernels to the plan
    (``_launch.Bound``); later steps compute only ``step_values`` and call the bound launchers."""
    control = arguments.get("control") or StepControl()
    step, kinds = step_values(plan, **{k: arguments[k] for k in _STEP_VALUE_ARGUMENTS if k in arguments})
    key = (param_dtype, rule, kinds, control.clip is None, control.grad_scale is None, control.found_inf is None,
           control.telemetry is None, control.skip_nonfinite,
           *[(k, _frozen(v)) for k, v in arguments.items() if k not in _STEP_VALUE_ARGUMENTS])
    bound = plan.launches.get(key)
    if bound is not None:
        filled = [b.fill(step) for b in bound]
        if None not in filled:
            with device_guard(plan.device):
                for b, args in zip(bound, filled):
                    b.run(args)
            return
    prologue, update = kernel_arguments(plan, param_dtype, rule, **arguments)
    launches = ((step_prologue_kernel, (triton.cdiv(len(plan.numels), PROLOGUE_TENSORS),), prologue),
                (optimizer_kernel, (plan.grid,), update))
    with device_guard(plan.device):
        for kernel, grid, kwargs in launches:
            _launch.launch(kernel, grid, kwargs)
        bound = [_launch.Bound.of(kernel, grid, kwargs, step, own=plan.table) for kernel, grid, kwargs in launches]
    if None not in bound:
        plan.launches[key] = bound


def aot_variants() -> list:
    """The specialisations the compile test and bench/kernel_report.py compile: each rule plain
    and with every flag its spec's ``aot_options`` set, in fp32 and bf16, aligned and not; tensor
    hyperparameters; clip-in-step + AMP and each mixed-precision mode; the prologue of each rule."""
    from ._launch import MULTI_TENSOR_BLOCKS
    from .aot import launched_variant
    from .optim_spec import SPECS

    plan = MultiTensorPlan([MULTI_TENSOR_BLOCKS[0] * 4], torch.device("cpu"), TABLE)  # the largest block
    rules = list({spec.rule: spec for spec in reversed(SPECS.values())}.values())[::-1]  # one spec a rule
    everything = StepControl(clip=torch.zeros(2), skip_nonfinite=True, grad_scale=torch.ones(()),
                             found_inf=torch.zeros(()), telemetry=torch.zeros(TELEMETRY_FIELDS.width,
                                                                              dtype=torch.float64))
    telemetry_only = StepControl(telemetry=everything.telemetry)

    def arguments(spec, options: dict, dtype=torch.float32, aligned=True, **more) -> tuple[dict, dict]:
        more.setdefault("lr", 1e-3)
        quantized = "precision" in more and more["precision"].state_dtype == torch.uint8
        return kernel_arguments(quantized_plan if quantized else plan, dtype, spec.rule, aligned=aligned,
                                states=spec.states_used(options), flags=spec.kernel_flags(options), **more)

    variants = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for aligned in (True, False):
            tag = f"{dtype_name}{'' if aligned else ',unaligned'}"
            for extra in (False, True):
                for spec in rules:
                    options = spec.aot_options if extra else {}
                    label = "".join(f",{k}" for k in options)
                    variants.append(launched_variant(f"{spec.name.lower()}[{tag}{label}]", optimizer_kernel,
                                                     arguments(spec, options, dtype, aligned)[1], aligned))
    eight_bit = Precision(state_dtype=torch.uint8)
    quantized_plan = MultiTensorPlan([MULTI_TENSOR_BLOCKS[0] * 4], torch.device("cpu"), TABLE, QUANTIZED_MAX_BLOCK)
    adam = rules[0]
    tensors = dict(lr=torch.zeros(()), beta1=torch.zeros(()), beta2=torch.zeros(()))
    variants.append(launched_variant("adam[fp32,tensor-lr-betas]", optimizer_kernel,
                                     arguments(adam, {"maximize": True}, **tensors)[1], True))
    for spec in rules:
        modes = (
            ("fp32,clip,amp", torch.float32, dict(control=everything)),
            ("bf16,master", torch.bfloat16, dict(precision=Precision(master=True))),
            ("bf16,bf16-states", torch.bfloat16, dict(precision=Precision(state_dtype=torch.bfloat16))),
            ("bf16,stochastic", torch.bfloat16, dict(precision=Precision(stochastic=True))),
            ("fp16,master,clip,amp", torch.float16, dict(control=everything, precision=Precision(master=True))),
            ("fp32,8bit", torch.float32, dict(precision=eight_bit)),
            ("fp32,8bit,clip,amp,telemetry", torch.float32, dict(control=everything, precision=eight_bit)),
            # 8-bit states beside 16-bit params launch 4 elements a thread (kernel_arguments): the bf16
            # streams take 64-bit accesses (a warp still reads 256 contiguous bytes), the codes 32-bit
            ("bf16,8bit", torch.bfloat16, dict(precision=eight_bit), dict(vector_loads=False, vector_stores=False)),
            ("bf16,master,8bit", torch.bfloat16, dict(precision=Precision(state_dtype=torch.uint8, master=True))),
        )
        for mode, dtype, more, *expect in modes:
            variants.append(launched_variant(f"{spec.name.lower()}[{mode}]", optimizer_kernel,
                                             arguments(spec, spec.aot_options, dtype, **more)[1], True,
                                             **(expect[0] if expect else {})))
        # telemetry over unaligned tensors: its per-thread row accumulators (multi_tensor.rows) beside
        # each mixed-precision mode's streams; element by element, no 128-bit access
        unaligned = (
            ("fp32", torch.float32, {}),
            ("bf16,master", torch.bfloat16, dict(precision=Precision(master=True))),
            ("fp16,master,clip,amp", torch.float16, dict(control=everything, precision=Precision(master=True))),
            ("bf16,fp32-states", torch.bfloat16, {}),
        )
        for mode, dtype, more in unaligned:
            more.setdefault("control", telemetry_only)
            variants.append(launched_variant(f"{spec.name.lower()}[{mode},unaligned,telemetry]", optimizer_kernel,
                                             arguments(spec, spec.aot_options, dtype, False, **more)[1], False))
    # the per-tensor prologue: scalar gathers, no 128-bit accesses
    for spec in rules:
        variants.append(launched_variant(f"step_prologue[{spec.name.lower()}]", step_prologue_kernel,
                                         arguments(spec, {})[0], False))
    variants.append(launched_variant("step_prologue[adam,tensor-lr-betas,skip]", step_prologue_kernel,
                                     arguments(adam, {}, control=everything, **tensors)[0], False))
    return variants
