"""Gradient clipping on one multi-tensor reduction kernel: torch's signatures and semantics.

``clip_grad_norm_``, ``get_total_norm`` and ``clip_grads_with_norm_`` behave as their
``torch.nn.utils`` twins (norm_type 2, inf, -inf, 0 or any p; ``error_if_nonfinite``; the
total norm comes back as a tensor). Differences from torch:

* the p = 0 "norm" (torch counts the tensors with a nonzero norm) is computed by torch;
* the norm is one launch for all tensors of a device, accumulated in fp32 per block and
  fp64 across blocks, without overflow for large gradients; scaling is one more launch;
* nothing synchronises with the host unless ``error_if_nonfinite=True``;
* ``foreach`` is accepted and has no effect;
* on DTensor grads (FSDP2) the norm of the local shards is all-reduced over the mesh, so
  every rank clips alike, and the norm comes back as a plain tensor holding the full norm.

For clipping fused into the optimizer step (no separate scaling pass), pass
``max_grad_norm=`` to any ``mechgpu.optim`` optimizer instead.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable

import torch

from ._backend import is_dtensor as _is_dtensor
from ._backend import kernels_run_on
from ._backend import local as _local
from .kernels import clip as clip_kernels
from .kernels.multi_tensor import MultiTensorPlan

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "get_total_norm"]

#: plans by segment (device, 16-byte aligned?, reduce groups); the owner (an optimizer, or
#: one call) keeps the dict
Plans = dict[tuple, MultiTensorPlan]


def _reduce_groups(t: torch.Tensor) -> tuple:
    """Process groups across which a DTensor's local norms must be combined."""
    if not _is_dtensor(t):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(t.placements)
                 if not placement.is_replicate())


def _plan_for(plans: Plans, key: tuple, tensors: list[torch.Tensor]) -> MultiTensorPlan:
    """The owner's plan for ``tensors``, its table pointing at them (uploaded only if they moved).

    Plans are never shared between owners: two optimizers with equal sizes each keep
    their own table, so neither re-uploads the other's (which a CUDA-graph capture refuses).
    """
    numels = [t.numel() for t in tensors]
    plan = plans.get(key)
    if plan is None or plan.numels != numels:
        plan = plans[key] = MultiTensorPlan(numels, key[0], clip_kernels.TABLE)
    plan.set_rows(clip_kernels.norm_rows(tensors))
    return plan


def _kernels_take(tensors: list[torch.Tensor]) -> bool:
    """The clip kernels run on every tensor: on a kernel device, in a dtype they read (fp32,
    bf16, fp16). Otherwise torch's own functions run, as mechgpu.nn and mechgpu.init do."""
    return all(kernels_run_on(_local(t).device) and _local(t).dtype in clip_kernels.DTYPE_CODES for t in tensors)


def _segments(tensors: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """Local tensors grouped by (device, 16-byte aligned?, reduce groups)."""
    segments: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        local = _local(t)
        if local.dtype not in clip_kernels.DTYPE_CODES:
            raise RuntimeError(f"mechgpu.clip: gradients must be float32, bfloat16 or float16, got {local.dtype}")
        if not local.is_contiguous():
            local = local.contiguous()  # a norm reads only: a contiguous copy is correct
        segments.setdefault((local.device, local.data_ptr() % 16 == 0, _reduce_groups(t)), []).append(local)
    return segments


def _torch_workspace(tensors: list[torch.Tensor], kind: int, norm_type: float) -> torch.Tensor:
    """The norm kernel's fp64 partial (sum |g|^p, NaN count, max or min |g|) of local tensors the
    kernels do not read (float64, complex, or on a device without the kernels), made by torch
    ops on their device: no host sync. NaNs are counted and left out of the sum and extreme."""
    device = tensors[0].device
    magnitudes = [t.detach().abs().double().reshape(-1) for t in tensors]  # |z| of complex too
    a = torch.cat(magnitudes) if magnitudes else torch.zeros(0, dtype=torch.float64, device=device)
    nan = a.isnan()
    workspace = clip_kernels.new_workspace(kind, device)  # the identities: no |g|^p, no extreme
    workspace[1] = nan.sum()
    if kind in (clip_kernels.KIND_MAX, clip_kernels.KIND_MIN):
        if a.numel():
            largest = kind == clip_kernels.KIND_MAX
            a = torch.where(nan, 0.0 if largest else math.inf, a)
            workspace[2] = a.amax() if largest else a.amin()
    else:
        powers = a * a if kind == clip_kernels.KIND_L2 else a if kind == clip_kernels.KIND_L1 else a.pow(norm_type)
        workspace[0] = torch.where(nan, 0.0, powers).sum()
    return workspace


def total_norm_into(out: torch.Tensor, tensors: list[torch.Tensor], norm_type: float, max_norm: float,
                    grad_scale: torch.Tensor | None = None, plans: Plans | None = None) -> None:
    """Write (norm of all tensors together, clip coefficient) into the fp32 [2] tensor ``out``
    (on a device the kernels run on).

    One launch per device when nothing needs combining; otherwise partial launches, an
    all-reduce for sharded DTensors, and a one-program finalize. Tensors the kernels do not
    read (float64, complex: an optimizer's groups that torch steps) add their partial from torch
    ops. No host sync. ``plans`` is the caller's own (an optimizer keeps one across steps); by
    default, a new one.
    """
    plans = {} if plans is None else plans
    others = [t for t in tensors if not _kernels_take([t])]
    segments = _segments([t for t in tensors if _kernels_take([t])])
    kind = clip_kernels.norm_kind(norm_type)
    if len(segments) == 1 and not others:
        key, members = next(iter(segments.items()))
        device, aligned, groups = key
        if not groups and device == out.device:
            plan = _plan_for(plans, key, members)
            workspace = clip_kernels.plan_workspace(plan, kind)
            clip_kernels.grad_norm(plan, workspace, out, norm_type=norm_type, max_norm=max_norm,
                                   aligned=aligned, grad_scale=grad_scale)
            return
    workspaces = []
    for key, members in segments.items():
        device, aligned, groups = key
        plan = _plan_for(plans, key, members)
        workspace = clip_kernels.new_workspace(kind, device)
        clip_kernels.grad_norm(plan, workspace, out, norm_type=norm_type, max_norm=max_norm,
                               aligned=aligned, finalize=False)
        workspaces.append((workspace, groups))
    by_device: dict[tuple, list[torch.Tensor]] = {}
    for t in others:
        by_device.setdefault((_local(t).device, _reduce_groups(t)), []).append(_local(t))
    for (_, groups), members in by_device.items():
        workspaces.append((_torch_workspace(members, kind, norm_type), groups))
    partials = []
    for workspace, groups in workspaces:
        for group in groups:
            _all_reduce_workspace(workspace, kind, group)
        partials.append(workspace.to(out.device, non_blocking=True))
    stacked = torch.stack(partials)
    combined = stacked.sum(0)
    if kind == clip_kernels.KIND_MAX:
        combined[2] = stacked[:, 2].max()
    elif kind == clip_kernels.KIND_MIN:
        combined[2] = stacked[:, 2].min()
    clip_kernels.grad_norm_finalize(combined, out, norm_type=norm_type, max_norm=max_norm,
                                    grad_scale=grad_scale)


def _all_reduce_workspace(workspace: torch.Tensor, kind: int, group) -> None:
    import torch.distributed as dist

    dist.all_reduce(workspace[:2], op=dist.ReduceOp.SUM, group=group)
    if kind in (clip_kernels.KIND_MAX, clip_kernels.KIND_MIN):
        op = dist.ReduceOp.MAX if kind == clip_kernels.KIND_MAX else dist.ReduceOp.MIN
        dist.all_reduce(workspace[2:], op=op, group=group)


def _raise_if_nonfinite(total: torch.Tensor, norm_type: float) -> None:
    """torch's check and message; reading the norm synchronises with the device."""
    if torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )


def _reject_empty_without_identity(tensors: list[torch.Tensor], norm_type: float) -> None:
    """torch's error: max, min and negative powers have no identity, so an empty tensor has no
    such norm (torch names the op that raised: _foreach_norm for +-inf, linalg.vector_norm else)."""
    if (math.isinf(norm_type) or norm_type < 0) and any(t.numel() == 0 for t in tensors):
        if math.isinf(norm_type):
            op, which = "_foreach_norm", "infinity" if norm_type > 0 else "-inf"
        else:
            op, which = "linalg.vector_norm", f"{norm_type:g}"
        raise RuntimeError(f"{op} cannot compute the {which} norm on an empty tensor because the "
                           "operation does not have an identity")


def _as_list(tensors) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _result_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def get_total_norm(tensors: torch.Tensor | Iterable[torch.Tensor], norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """The norm of all ``tensors`` together, as torch.nn.utils.get_total_norm computes it."""
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    first_device = _local(tensors[0]).device
    _reject_empty_without_identity(tensors, norm_type)
    if norm_type == 0.0 or not _kernels_take(tensors):
        from torch.nn.utils import get_total_norm as torch_get_total_norm

        return torch_get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    out = torch.empty(2, dtype=torch.float32, device=first_device)
    total_norm_into(out, tensors, norm_type, max_norm=1.0)
    total = out[0].to(_result_dtype(tensors))
    if error_if_nonfinite:
        _raise_if_nonfinite(total, norm_type)
    return total


def clip_grads_with_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float,
                          total_norm: torch.Tensor, foreach: bool | None = None) -> None:
    """Scale the grads of ``parameters`` by min(max_norm / (total_norm + 1e-6), 1), in place."""
    parameters = _as_list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    max_norm = float(max_norm)
    if len(grads) == 0:
        return
    if not _kernels_take(grads):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
        return
    if _is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()
    coef = torch.clamp(max_norm / (total_norm.float() + 1e-6), max=1.0)
    _scale_grads(grads, coef)


def _scale_grads(grads: list[torch.Tensor], coef: torch.Tensor, plans: Plans | None = None) -> None:
    """grads *= coef (a 0-d tensor) with one launch per (device, alignment)."""
    plans = {} if plans is None else plans
    by_key: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        local = _local(g)
        if not _kernels_take([local]) or not local.is_contiguous():
            local.mul_(coef.to(local.device, non_blocking=True))
            continue
        by_key.setdefault((local.device, local.data_ptr() % 16 == 0, ()), []).append(local)
    for key, members in by_key.items():
        device, aligned, _ = key
        plan = _plan_for(plans, key, members)
        clip_kernels.scale_(plan, coef.to(device, non_blocking=True), aligned=aligned)


def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> torch.Tensor:
    """Clip the grads of ``parameters`` to a total norm of at most ``max_norm``; return that norm.

    Same contract as torch.nn.utils.clip_grad_norm_: the norm is of all grads together, and
    grads are scaled by min(max_norm / (norm + 1e-6), 1).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not grads or norm_type == 0.0 or not _kernels_take(grads):
        total = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
        clip_grads_with_norm_(parameters, max_norm, total, foreach)
        return total
    first_device = _local(grads[0]).device
    out = torch.empty(2, dtype=torch.float32, device=first_device)
    _reject_empty_without_identity(grads, norm_type)
    plans: Plans = {}  # this call's: the scaling launch reuses the norm's table
    total_norm_into(out, grads, norm_type, float(max_norm), plans=plans)
    total = out[0].to(_result_dtype(grads))
    if error_if_nonfinite:
        _raise_if_nonfinite(total, norm_type)
    _scale_grads(grads, out[1], plans)
    return total
