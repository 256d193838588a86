"""Fused multi-tensor optimizer steps: Adam/AdamW, RMSprop and SGD in one launch each.

Every kernel walks a ``MultiTensorPlan`` (see ``multi_tensor.py``): program ``pid``
updates one BLOCK-sized slice of one tensor, reading the tensor's addresses from the
device-resident table. The math runs in fp32 and matches ``torch.optim`` to fp32
rounding. Params and grads are fp32, bf16 or fp16; states are fp32 or bf16. Hyper-
parameters are runtime arguments (or 0-d device tensors, read in the kernel), so a new
learning rate never recompiles. Constexprs select features that change the code.

Step counters live on the device. Each program computes with ``step + 1``; the last
program of a tensor to finish (counted with an atomic) writes ``step + 1`` back, so the
step never round-trips through the host.

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
and stores. Tensors at unaligned storage offsets go to a separate launch without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import TL_DTYPES, device_guard
from .multi_tensor import MultiTensorPlan, TableLayout
from .rounding import round_like

#: One row per tensor: its param, grad, up to three states (adam: exp_avg, exp_avg_sq,
#: max_exp_avg_sq; rmsprop: square_avg, momentum_buffer, grad_avg; sgd: momentum_buffer),
#: its fp32 step counter, its element count and its fp32 master copy.
TABLE = TableLayout("param", "grad", "state0", "state1", "state2", "step", "numel", "master")
_COL_PARAM = TABLE.constexpr("param")
_COL_GRAD = TABLE.constexpr("grad")
_COL_STATE0 = TABLE.constexpr("state0")
_COL_STATE1 = TABLE.constexpr("state1")
_COL_STATE2 = TABLE.constexpr("state2")
_COL_STEP = TABLE.constexpr("step")
_COL_NUMEL = TABLE.constexpr("numel")
_COL_MASTER = TABLE.constexpr("master")
_NCOL = tl.constexpr(TABLE.width)
_STATE_COLUMNS = ("state0", "state1", "state2")


def row_is_aligned(row: list[int]) -> bool:
    """Whether every address the kernel streams through (not the step counter) is 16-byte aligned,
    as the ``ALIGNED`` variant assumes; columns left 0 are."""
    return all(row[TABLE.index(c)] % 16 == 0 for c in ("param", "grad", *_STATE_COLUMNS, "master"))


def table_row(*, param: int, grad: int, states: list[int], step: int, numel: int, master: int = 0) -> list[int]:
    """One optimizer table row; ``states`` are the addresses of the kernel's state columns in
    order (0 for one the kernel does not read)."""
    if len(states) > len(_STATE_COLUMNS):
        raise ValueError(f"at most {len(_STATE_COLUMNS)} state columns, got {len(states)}")
    return TABLE.row(param=param, grad=grad, step=step, numel=numel, master=master,
                     **dict(zip(_STATE_COLUMNS, states)))


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


@triton.jit
def _pow_int(base, n):
    """base ** n for fp64 base and integer n >= 0, by repeated squaring (no libdevice)."""
    result = base * 0.0 + 1.0
    while n > 0:
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
def _program_slice(table_ptr, blocks_ptr, skip, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """(tensor index, table row, element count, offsets, is-full-block) of this program.

    A skipped step sees an element count of 0, so every access is masked off.
    """
    pid = tl.program_id(0)
    tensor_idx = tl.load(blocks_ptr + 2 * pid)
    block_idx = tl.load(blocks_ptr + 2 * pid + 1)
    row = table_ptr + tensor_idx.to(tl.int64) * _NCOL
    numel = tl.load(row + _COL_NUMEL)
    numel = tl.where(skip, 0, numel)
    start = block_idx.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    return tensor_idx, row, numel, offs, start + BLOCK <= numel


@triton.jit
def _read_step(row, skip):
    """(step before, step after this update): the step does not count when skipped."""
    step = tl.load(tl.load(row + _COL_STEP).to(tl.pointer_type(tl.float32)))
    return step, tl.where(skip, step, step + 1.0)


@triton.jit
def _finish_step(row, done_ptr, tensor_idx, new_step, BLOCK: tl.constexpr):
    """The last program of a tensor to finish stores its step counter."""
    numel = tl.load(row + _COL_NUMEL)
    nblocks = tl.maximum(tl.cdiv(numel, BLOCK), 1)
    finished = tl.atomic_add(done_ptr + tensor_idx, 1)
    if finished == nblocks - 1:
        step_ptr = tl.load(row + _COL_STEP).to(tl.pointer_type(tl.float32))
        tl.store(step_ptr, new_step)
        tl.store(done_ptr + tensor_idx, 0)


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula, which is exact at both ends."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _load_param_grad(param_ptr, master_ptr, grad_ptr, offs, mask, multiplier,
                     SCALE_GRAD: tl.constexpr, MASTER: tl.constexpr):
    """fp32 param (from the master copy if any) and fp32 grad (unscaled and clipped)."""
    if MASTER:
        p = tl.load(master_ptr + offs, mask=mask)
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
    if MASTER:
        tl.store(master_ptr + offs, p, mask=mask)
    if STOCHASTIC:
        tl.store(param_ptr + offs, _stochastic_round_bf16(p, seed, offs), mask=mask)
    else:
        tl.store(param_ptr + offs, round_like(p, param_ptr), mask=mask)


@triton.jit
def _add_update_norm(update_sq_ptr, p_new, p_old, mask):
    """Add this block's sum of (p_new - p_old)^2 to the step's fp64 update-norm workspace."""
    delta = p_new - p_old
    if mask is not None:
        delta = tl.where(mask, delta, 0.0)
    tl.atomic_add(update_sq_ptr, tl.sum(delta * delta, axis=0).to(tl.float64))


# Stochastic rounding's Philox seed: distinct primes, so (tensor, step) pairs map to distinct seeds.
_TENSOR_SEED_STRIDE = tl.constexpr(1000003)
_STEP_SEED_STRIDE = tl.constexpr(7919)


@triton.jit
def _rounding_seed(seed, tensor_idx, step):
    """A fresh Philox seed for each (tensor, step) pair."""
    return seed + tensor_idx * _TENSOR_SEED_STRIDE + step.to(tl.int32) * _STEP_SEED_STRIDE


# ----------------------------------------------------------------------------------
# the update rules: each formula once, on fp32 values
# ----------------------------------------------------------------------------------
ADAM, RMSPROP, SGD = range(3)  # the RULE constexpr
_ADAM = tl.constexpr(ADAM)
_RMSPROP = tl.constexpr(RMSPROP)
_SGD = tl.constexpr(SGD)


@triton.jit
def adam_update(p, g, m, v, vmax, lr, beta1_weight, beta2, one_minus_beta2, eps, weight_decay,
                step_size, bias_correction2_sqrt,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED_WD: tl.constexpr):
    """One Adam element update, fp32, in torch.optim's order of operations.

    g <- -g if maximize;  p <- p(1 - lr wd) (decoupled) or g <- g + wd p
    m <- lerp(m, g, 1 - beta1);  v <- beta2 v + (1 - beta2) g^2;  vmax <- max(vmax, v)
    p <- p - step_size * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps),
    step_size = lr / (1 - beta1^t)
    """
    if MAXIMIZE:
        g = -g
    if weight_decay != 0.0:
        if DECOUPLED_WD:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = _lerp(m, g, beta1_weight)
    v = v * beta2 + one_minus_beta2 * (g * g)
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bias_correction2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v, vmax


@triton.jit
def rmsprop_update(p, g, sq, g_avg, buf, lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
                   CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr):
    """One RMSprop element update, fp32, in torch.optim's order of operations.

    g <- -g if maximize;  g <- g + wd p
    sq <- alpha sq + (1 - alpha) g^2;  g_avg <- lerp(g_avg, g, 1 - alpha) (centered)
    avg <- sqrt(sq - g_avg^2 if centered else sq) + eps
    buf <- momentum buf + g / avg;  p <- p - lr buf   (or p <- p - lr g / avg)
    """
    if MAXIMIZE:
        g = -g
    if weight_decay != 0.0:
        g = g + weight_decay * p
    sq = sq * alpha + one_minus_alpha * (g * g)
    if CENTERED:
        g_avg = _lerp(g_avg, g, one_minus_alpha)
        avg = tl.sqrt_rn(sq - g_avg * g_avg) + eps
    else:
        avg = tl.sqrt_rn(sq) + eps
    if HAS_MOMENTUM:
        buf = buf * momentum + tl.div_rn(g, avg)
        p = p - lr * buf
    else:
        p = p - lr * tl.div_rn(g, avg)
    return p, sq, g_avg, buf


@triton.jit
def sgd_update(p, g, buf, first, lr, weight_decay, momentum, one_minus_dampening,
               HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr):
    """One SGD element update, fp32, in torch.optim's order of operations.

    g <- -g if maximize;  g <- g + wd p
    buf <- g on the first step, else momentum buf + (1 - dampening) g
    g <- g + momentum buf (nesterov) or buf;  p <- p - lr g
    """
    if MAXIMIZE:
        g = -g
    if weight_decay != 0.0:
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        if first:
            buf = g
        else:
            buf = buf * momentum + one_minus_dampening * g
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    return p, buf


# ----------------------------------------------------------------------------------
# the one multi-tensor optimizer kernel
# ----------------------------------------------------------------------------------
@triton.jit
def _rule_block(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, update_sq_ptr, offs, mask,
                multiplier, seed, lr, beta1_weight, beta2, one_minus_beta2, eps, weight_decay, momentum,
                one_minus_dampening, step_size, bias_correction2_sqrt, first,
                RULE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED_WD: tl.constexpr, CENTERED: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                SCALE_GRAD: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, UPDATE_NORM: tl.constexpr):
    """One block: load p and g, the rule's states, update, store. States are read only where the
    rule and its options use them (``TABLE``'s comment gives each rule's state columns)."""
    p, g = _load_param_grad(param_ptr, master_ptr, grad_ptr, offs, mask, multiplier, SCALE_GRAD, MASTER)
    p_old = p
    if RULE == _ADAM:
        m = tl.load(state0_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(state1_ptr + offs, mask=mask).to(tl.float32)
        vmax = v
        if AMSGRAD:
            vmax = tl.load(state2_ptr + offs, mask=mask).to(tl.float32)
        p, m, v, vmax = adam_update(p, g, m, v, vmax, lr, beta1_weight, beta2, one_minus_beta2, eps, weight_decay,
                                    step_size, bias_correction2_sqrt, AMSGRAD, MAXIMIZE, DECOUPLED_WD)
        tl.store(state0_ptr + offs, round_like(m, state0_ptr), mask=mask)
        tl.store(state1_ptr + offs, round_like(v, state1_ptr), mask=mask)
        if AMSGRAD:
            tl.store(state2_ptr + offs, round_like(vmax, state2_ptr), mask=mask)
    elif RULE == _RMSPROP:
        sq = tl.load(state0_ptr + offs, mask=mask).to(tl.float32)
        buf = sq
        g_avg = sq
        if HAS_MOMENTUM:
            buf = tl.load(state1_ptr + offs, mask=mask).to(tl.float32)
        if CENTERED:
            g_avg = tl.load(state2_ptr + offs, mask=mask).to(tl.float32)
        p, sq, g_avg, buf = rmsprop_update(p, g, sq, g_avg, buf, lr, beta2, one_minus_beta2, eps, weight_decay,
                                           momentum, CENTERED, HAS_MOMENTUM, MAXIMIZE)
        tl.store(state0_ptr + offs, round_like(sq, state0_ptr), mask=mask)
        if HAS_MOMENTUM:
            tl.store(state1_ptr + offs, round_like(buf, state1_ptr), mask=mask)
        if CENTERED:
            tl.store(state2_ptr + offs, round_like(g_avg, state2_ptr), mask=mask)
    else:
        buf = g
        if HAS_MOMENTUM:
            if not first:
                buf = tl.load(state0_ptr + offs, mask=mask).to(tl.float32)
        p, buf = sgd_update(p, g, buf, first, lr, weight_decay, momentum, one_minus_dampening,
                            HAS_MOMENTUM, NESTEROV, MAXIMIZE)
        if HAS_MOMENTUM:
            tl.store(state0_ptr + offs, round_like(buf, state0_ptr), mask=mask)
    if UPDATE_NORM:
        _add_update_norm(update_sq_ptr, p, p_old, mask)
    _store_param(param_ptr, master_ptr, p, offs, mask, seed, MASTER, STOCHASTIC)


@triton.jit
def _state_ptr(row, COL: tl.constexpr, USED: tl.constexpr, fallback, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A state column's pointer where the rule reads it; else ``fallback``, which is never dereferenced."""
    if USED:
        return _table_ptr(row, COL, DTYPE, ALIGNED)
    else:
        return fallback.to(tl.pointer_type(DTYPE))


@triton.jit
def optimizer_kernel(table_ptr, blocks_ptr, done_ptr, control_ptr, grad_scale_ptr, found_inf_ptr, update_sq_ptr,
                     seed, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, momentum,
                     one_minus_dampening,
                     RULE: tl.constexpr, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                     LR_IS_PTR: tl.constexpr, BETAS_ARE_PTRS: tl.constexpr, WD_IS_PTR: tl.constexpr,
                     AMSGRAD: tl.constexpr, DECOUPLED_WD: tl.constexpr, CENTERED: tl.constexpr,
                     HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                     CLIP: tl.constexpr, SKIP_NONFINITE: tl.constexpr, UNSCALE: tl.constexpr,
                     FOUND_INF: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
                     UPDATE_NORM: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One optimizer step over every tensor of a table; ``RULE`` picks Adam/AdamW, RMSprop or SGD.

    Hyperparameters: ``beta2``/``one_minus_beta2`` are the decay of the squared-grad average,
    Adam's beta2 and RMSprop's alpha; ``beta1``/``one_minus_beta1`` Adam's first-moment decay;
    ``momentum`` and ``one_minus_dampening`` RMSprop's and SGD's. Adam's bias corrections
    1 - beta^t are computed per tensor in fp64 from its own step. SGD's step column holds a
    private count of steps (torch's SGD keeps none); at 0 the momentum buffer is set to the
    grad, as torch does on its first step.

    Bytes per element: ``mechgpu.traffic.optimizer_step_bytes`` (p and g read, p written, each
    state the rule and options use read and written; an fp32 master read and written instead
    of reading p), which tests/test_traffic.py checks against this kernel's loads and stores.
    """
    multiplier, skip = _grad_control(control_ptr, grad_scale_ptr, found_inf_ptr,
                                     CLIP, SKIP_NONFINITE, UNSCALE, FOUND_INF)
    tensor_idx, row, numel, offs, full = _program_slice(table_ptr, blocks_ptr, skip, BLOCK, ALIGNED)
    param_ptr = _table_ptr(row, _COL_PARAM, PARAM_DTYPE, ALIGNED)
    grad_ptr = _table_ptr(row, _COL_GRAD, PARAM_DTYPE, ALIGNED)
    state0_ptr = _state_ptr(row, _COL_STATE0, RULE != _SGD or HAS_MOMENTUM, grad_ptr, STATE_DTYPE, ALIGNED)
    state1_ptr = _state_ptr(row, _COL_STATE1, RULE == _ADAM or (RULE == _RMSPROP and HAS_MOMENTUM), state0_ptr,
                            STATE_DTYPE, ALIGNED)
    state2_ptr = _state_ptr(row, _COL_STATE2, (RULE == _ADAM and AMSGRAD) or (RULE == _RMSPROP and CENTERED),
                            state0_ptr, STATE_DTYPE, ALIGNED)
    master_ptr = _state_ptr(row, _COL_MASTER, MASTER, grad_ptr, tl.float32, ALIGNED)
    step, new_step = _read_step(row, skip)
    first = step == 0.0  # SGD's first step sets the momentum buffer to the grad
    lr = _scalar(lr, LR_IS_PTR)
    weight_decay = _scalar(weight_decay, WD_IS_PTR)
    beta2_32 = _scalar(beta2, BETAS_ARE_PTRS)
    beta1_weight = one_minus_beta1
    step_size = lr
    bias_correction2_sqrt = lr
    if BETAS_ARE_PTRS:
        beta1_32 = tl.load(beta1).to(tl.float32)
        beta1_weight = 1.0 - beta1_32
        one_minus_beta2 = 1.0 - beta2_32
        beta1_64 = beta1_32.to(tl.float64)
        beta2_64 = beta2_32.to(tl.float64)
    else:
        # 1 - beta arrives rounded to fp32 with full relative precision, so rebuilding
        # beta from it in fp64 keeps 1 - beta^t accurate even for beta2 = 0.9999.
        beta1_64 = 1.0 - tl.cast(one_minus_beta1, tl.float64)
        beta2_64 = 1.0 - tl.cast(one_minus_beta2, tl.float64)
    if RULE == _ADAM:
        n = new_step.to(tl.int32)
        bias_correction1 = 1.0 - _pow_int(beta1_64, n)
        bias_correction2 = 1.0 - _pow_int(beta2_64, n)
        step_size = (lr.to(tl.float64) / bias_correction1).to(tl.float32)
        bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    seed = _rounding_seed(seed, tensor_idx, new_step)

    if full:
        _rule_block(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, update_sq_ptr, offs, None,
                    multiplier, seed, lr, beta1_weight, beta2_32, one_minus_beta2, eps, weight_decay, momentum,
                    one_minus_dampening, step_size, bias_correction2_sqrt, first,
                    RULE, AMSGRAD, DECOUPLED_WD, CENTERED, HAS_MOMENTUM, NESTEROV, MAXIMIZE,
                    CLIP or UNSCALE, MASTER, STOCHASTIC, UPDATE_NORM)
    else:
        _rule_block(param_ptr, grad_ptr, state0_ptr, state1_ptr, state2_ptr, master_ptr, update_sq_ptr, offs,
                    offs < numel, multiplier, seed, lr, beta1_weight, beta2_32, one_minus_beta2, eps, weight_decay,
                    momentum, one_minus_dampening, step_size, bias_correction2_sqrt, first,
                    RULE, AMSGRAD, DECOUPLED_WD, CENTERED, HAS_MOMENTUM, NESTEROV, MAXIMIZE,
                    CLIP or UNSCALE, MASTER, STOCHASTIC, UPDATE_NORM)
    _finish_step(row, done_ptr, tensor_idx, new_step, BLOCK)


# launchers: plain Python, torch tensors in
# ----------------------------------------------------------------------------------


@dataclass
class StepControl:
    """Per-step grad control read by the kernel from device memory (all optional).

    clip: fp32 ``[2]`` tensor ``(total_norm, clip_coef)`` written by ``clip.py``'s norm kernel.
    skip_nonfinite: skip the step when ``clip[0]`` is inf or NaN.
    update_sq: when given, each program adds its block's squared update, so the step's
    update norm costs one atomic per block and no extra pass.
    grad_scale, found_inf: GradScaler's tensors (grads are divided by grad_scale; a
    nonzero found_inf skips the step).
    """

    clip: torch.Tensor | None = None
    skip_nonfinite: bool = False
    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    update_sq: torch.Tensor | None = None  # fp64 scalar the kernel adds sum((p_new - p_old)^2) to


@dataclass
class Precision:
    """How params and states are stored: state dtype, fp32 master copy, stochastic rounding."""

    state_dtype: torch.dtype = torch.float32
    master: bool = False
    stochastic: bool = False
    seed: int = 0


def _hyper(value):
    """A float stays a runtime scalar; a 0-d tensor is passed by address."""
    if isinstance(value, torch.Tensor):
        return value, True
    return float(value), False


#: Every option a rule may set, and its value when the rule does not
RULE_OPTIONS = {"AMSGRAD": False, "DECOUPLED_WD": False, "CENTERED": False, "HAS_MOMENTUM": False,
                "NESTEROV": False, "MAXIMIZE": False}


def launch(plan: MultiTensorPlan, param_dtype: torch.dtype, rule: int, *, aligned: bool, lr, weight_decay=0.0,
           beta1=0.0, beta2=0.0, eps: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
           options: dict[str, bool], control: StepControl | None = None,
           precision: Precision | None = None) -> None:
    """One step of ``rule`` over every tensor in ``plan``: one launch, every argument by name.

    ``lr``, ``weight_decay`` and the betas may be 0-d device tensors (read in the kernel);
    ``options`` sets RULE_OPTIONS' flags for the rule.
    """
    control = control or StepControl()
    precision = precision or Precision()
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
    with device_guard(plan.device):
        optimizer_kernel[(plan.num_programs,)](
            table_ptr=plan.table, blocks_ptr=plan.blocks, done_ptr=plan.done,
            control_ptr=control.clip if control.clip is not None else spare,
            grad_scale_ptr=control.grad_scale if control.grad_scale is not None else spare,
            found_inf_ptr=control.found_inf if control.found_inf is not None else spare,
            update_sq_ptr=control.update_sq if control.update_sq is not None else spare,
            seed=precision.seed, lr=lr, beta1=beta1, beta2=beta2, one_minus_beta1=one_minus_beta1,
            one_minus_beta2=one_minus_beta2, eps=float(eps), weight_decay=weight_decay, momentum=float(momentum),
            one_minus_dampening=1.0 - float(dampening),
            RULE=rule, PARAM_DTYPE=TL_DTYPES[param_dtype], STATE_DTYPE=TL_DTYPES[precision.state_dtype],
            LR_IS_PTR=lr_is_ptr, BETAS_ARE_PTRS=betas_are_ptrs, WD_IS_PTR=wd_is_ptr, **{**RULE_OPTIONS, **options},
            CLIP=control.clip is not None, SKIP_NONFINITE=control.skip_nonfinite and control.clip is not None,
            UNSCALE=control.grad_scale is not None, FOUND_INF=control.found_inf is not None,
            MASTER=precision.master, STOCHASTIC=precision.stochastic, UPDATE_NORM=control.update_sq is not None,
            ALIGNED=aligned, BLOCK=plan.block, num_warps=plan.num_warps,
        )


def aot_variants() -> list:
    """The specialisations the compile test and bench/kernel_report.py compile."""
    from ._launch import MULTI_TENSOR_BLOCKS, multi_tensor_warps
    from .aot import variant

    block = MULTI_TENSOR_BLOCKS[0]
    warps = multi_tensor_warps(block)
    sig = {"table_ptr": "*i64", "blocks_ptr": "*i32", "done_ptr": "*i32", "control_ptr": "*fp32",
           "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "update_sq_ptr": "*fp64", "seed": "i32",
           "lr": "fp32", "beta1": "fp32", "beta2": "fp32", "one_minus_beta1": "fp32", "one_minus_beta2": "fp32",
           "eps": "fp32", "weight_decay": "fp32", "momentum": "fp32", "one_minus_dampening": "fp32"}
    plain = {"CLIP": False, "SKIP_NONFINITE": False, "UNSCALE": False, "FOUND_INF": False,
             "MASTER": False, "STOCHASTIC": False, "UPDATE_NORM": False,
             "LR_IS_PTR": False, "BETAS_ARE_PTRS": False, "WD_IS_PTR": False, **RULE_OPTIONS}
    everything = {"CLIP": True, "SKIP_NONFINITE": True, "UNSCALE": True, "FOUND_INF": True, "UPDATE_NORM": True}
    # (name, rule, its options in the plain and in the "extra" variant)
    rules = (("adam", ADAM, {"AMSGRAD": True, "DECOUPLED_WD": True}, "amsgrad,adamw"),
             ("rmsprop", RMSPROP, {"CENTERED": True, "HAS_MOMENTUM": True}, "centered,momentum"),
             ("sgd", SGD, {"HAS_MOMENTUM": True, "NESTEROV": True}, "momentum,nesterov"))
    variants = []
    for dtype_name, dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        for aligned in (True, False):
            tag = f"{dtype_name}{'' if aligned else ',unaligned'}"
            common = dict(plain, PARAM_DTYPE=dtype, STATE_DTYPE=tl.float32, ALIGNED=aligned, BLOCK=block)
            for extra in (False, True):
                for name, rule, options, label in rules:
                    cx = dict(common, RULE=rule, **(options if extra else {}))
                    variants.append(variant(f"{name}[{tag}{',' + label if extra else ''}]", optimizer_kernel, sig,
                                            cx, aligned, warps))
    # tensor hyperparameters (lr and betas read from device memory)
    cx = dict(plain, RULE=ADAM, PARAM_DTYPE=tl.float32, STATE_DTYPE=tl.float32, MAXIMIZE=True, ALIGNED=True,
              BLOCK=block, LR_IS_PTR=True, BETAS_ARE_PTRS=True)
    variants.append(variant("adam[fp32,tensor-lr-betas]", optimizer_kernel,
                            dict(sig, lr="*fp32", beta1="*fp32", beta2="*fp32"), cx, True, warps))
    # clip-in-step + AMP, and each mixed-precision mode
    for name, rule, options in (("adam", ADAM, {"DECOUPLED_WD": True}), ("rmsprop", RMSPROP, {"HAS_MOMENTUM": True}),
                                ("sgd", SGD, {"HAS_MOMENTUM": True})):
        base = dict(plain, RULE=rule, ALIGNED=True, BLOCK=block, **options)
        modes = (
            ("fp32,clip,amp", dict(everything, PARAM_DTYPE=tl.float32, STATE_DTYPE=tl.float32)),
            ("bf16,master", dict(PARAM_DTYPE=tl.bfloat16, STATE_DTYPE=tl.float32, MASTER=True)),
            ("bf16,bf16-states", dict(PARAM_DTYPE=tl.bfloat16, STATE_DTYPE=tl.bfloat16)),
            ("bf16,stochastic", dict(PARAM_DTYPE=tl.bfloat16, STATE_DTYPE=tl.float32, STOCHASTIC=True)),
            ("fp16,master,clip,amp", dict(everything, PARAM_DTYPE=tl.float16, STATE_DTYPE=tl.float32,
                                          MASTER=True)),
        )
        for mode, flags in modes:
            variants.append(variant(f"{name}[{mode}]", optimizer_kernel, sig, dict(base, **flags), True, warps))
    return variants
