"""The shared step of every mechgpu optimizer: validate, group, build tables, launch.

Each optimizer subclasses its ``torch.optim`` twin, so the constructor, its validation
messages, ``param_groups``, ``add_param_group``, ``zero_grad``, ``state_dict`` and
scheduler hooks are torch's own. Only ``step`` (and a fix-up in ``load_state_dict`` that
keeps optimizer states in fp32) is ours.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import torch

from ..kernels import optim as optim_kernels
from ..kernels.multi_tensor import MultiTensorPlan

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned_cpu_fallback = False


def kernels_run_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""
    return device.type == "cuda" or (device.type == "cpu" and optim_kernels.INTERPRETED)


def _warn_cpu_fallback(name: str) -> None:
    global _warned_cpu_fallback
    if not _warned_cpu_fallback:
        _warned_cpu_fallback = True
        warnings.warn(
            f"mechgpu.optim.{name}: parameters are on the CPU and TRITON_INTERPRET=1 is not set, so "
            f"this step runs torch.optim.{name}'s own implementation instead of mechgpu's Triton "
            "kernel. Move the model to CUDA, or set TRITON_INTERPRET=1 before importing triton to "
            "run the kernels on the CPU (slowly). This warning is shown once.",
            stacklevel=3,
        )


def _is_dense(t: torch.Tensor) -> bool:
    """True when the elements fill a contiguous span of memory in some order (no gaps, no overlap)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


class FusedOptimizer:
    """Mixin placed before the torch optimizer class in the MRO."""

    #: state keys in table order (columns STATE0..STATE2); subclasses fill this in per group
    _torch_name = ""

    def _state_keys(self, group: dict) -> tuple[str | None, ...]:
        raise NotImplementedError

    def _has_step(self) -> bool:
        return True

    def _launch(self, plan: MultiTensorPlan, dtype: torch.dtype, group: dict, aligned: bool) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------
    def _error(self, message: str, exc=RuntimeError):
        return exc(f"mechgpu.optim.{self._torch_name}: {message}")

    def _sparse_message(self) -> str:
        return f"mechgpu.optim.{self._torch_name} does not support sparse gradients"

    def _check_group(self, group_index: int, group: dict, params: list[torch.Tensor]) -> None:
        """Every check that can fail, before anything is written."""
        device = params[0].device
        for i, p in enumerate(params):
            g = p.grad
            where = f"param {i} of group {group_index}"
            if g.is_sparse:
                raise RuntimeError(self._sparse_message())
            if p.is_complex():
                raise self._error(f"complex parameters are not supported ({where} is {p.dtype})")
            if p.dtype not in SUPPORTED_DTYPES:
                raise self._error(f"supports float32, bfloat16 and float16 parameters; {where} is {p.dtype}")
            if p.device != device:
                raise self._error(f"all params of a group must be on one device; {where} is on "
                                  f"{p.device}, the group's first param on {device}")
            if g.dtype != p.dtype:
                raise self._error(f"the grad of {where} has dtype {g.dtype}, its param {p.dtype}")
            if g.shape != p.shape:
                raise self._error(f"the grad of {where} has shape {tuple(g.shape)}, its param {tuple(p.shape)}")
            if g.device != p.device:
                raise self._error(f"the grad of {where} is on {g.device}, its param on {p.device}")
            if not _is_dense(p):
                raise self._error(f"{where} is not contiguous (shape {tuple(p.shape)}, stride {p.stride()}); "
                                  "pass contiguous parameters")
            if g.stride() != p.stride():
                raise self._error(f"the grad of {where} has stride {g.stride()}, its param {p.stride()}; "
                                  "grads must share their param's memory layout")
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device != device and lr.device.type != "cpu":
            raise self._error(f"group {group_index}'s tensor lr is on {lr.device}, its params on {device}")

    def _ensure_state(self, p: torch.Tensor, group: dict) -> bool:
        """Create or repair p's state for the kernel (fp32 states, step on p's device).

        Returns True when a state buffer was created by this call (a first step).
        """
        state = self.state[p]
        created = False
        if self._has_step():
            step = state.get("step")
            if step is None:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            elif not torch.is_tensor(step):
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
            elif step.device != p.device or step.dtype != torch.float32:
                state["step"] = step.to(device=p.device, dtype=torch.float32)
        for key in self._state_keys(group):
            if key is None:
                continue
            buf = state.get(key)
            if buf is None:
                state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                created = True
            elif buf.dtype != torch.float32 or buf.device != p.device or buf.stride() != p.stride():
                fixed = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state[key] = fixed.copy_(buf)
        return created

    def _hyper(self, value, device: torch.device):
        """A tensor hyperparameter on the params' device is read by the kernel; a CPU one is a float."""
        if isinstance(value, torch.Tensor) and value.device != device:
            return float(value)  # a CPU tensor: no device synchronisation
        return value

    # ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One optimisation step: one kernel launch per (param group, dtype)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        fallback_groups = []
        for group_index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            self._check_group(group_index, group, params)
            if kernels_run_on(params[0].device):
                work.append((group_index, group, params))
            else:
                fallback_groups.append(group)

        if fallback_groups:
            _warn_cpu_fallback(self._torch_name)
            self._torch_step(fallback_groups)

        if not hasattr(self, "_plans"):
            self._plans = {}
        for group_index, group, params in work:
            self._step_group(group_index, group, params)
        return loss

    def _step_group(self, group_index: int, group: dict, params: list[torch.Tensor]) -> None:
        keys = self._state_keys(group)
        has_step = self._has_step()
        buckets: dict[tuple[torch.dtype, bool], tuple[list, list]] = {}
        for p in params:
            first = self._ensure_state(p, group)
            state = self.state[p]
            ptrs = [p.data_ptr(), p.grad.data_ptr()]
            ptrs += [state[k].data_ptr() if k is not None else 0 for k in keys]
            aligned = all(ptr % 16 == 0 for ptr in ptrs)
            ptrs += [0] * (5 - len(ptrs))
            row = ptrs + [state["step"].data_ptr() if has_step else 0, p.numel(), int(first)]
            members, rows = buckets.setdefault((p.dtype, aligned), ([], []))
            members.append(p)
            rows.append(row)

        device = params[0].device
        for (dtype, aligned), (members, rows) in buckets.items():
            key = (group_index, dtype, aligned)
            ids = [id(p) for p in members]
            plan = self._plans.get(key)
            if plan is None or plan.param_ids != ids or plan.device != device:
                plan = MultiTensorPlan([p.numel() for p in members], device)
                plan.param_ids = ids
                self._plans[key] = plan
            plan.set_rows(rows)
            self._launch(plan, dtype, group, aligned)

    def _torch_step(self, groups: list[dict]) -> None:
        """torch.optim's own step, for CPU params when the kernels cannot run there."""
        torch_cls = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.optim"))
        fn = torch_cls.step
        if getattr(fn, "hooked", False):  # torch's profiling/hook wrapper: our own step already ran the hooks
            fn = fn.__wrapped__
        saved_groups = self.param_groups
        saved_capturable = [g.get("capturable") for g in groups]
        try:
            self.param_groups = groups
            for g in groups:
                if "capturable" in g:
                    g["capturable"] = False  # torch's capturable path rejects CPU tensors
            fn(self)
        finally:
            self.param_groups = saved_groups
            for g, c in zip(groups, saved_capturable):
                if c is not None:
                    g["capturable"] = c

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, but states of bf16/fp16 params stay fp32 as saved."""
        saved_state = state_dict["state"]
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        super().load_state_dict(state_dict)
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            if p.dtype == torch.float32 or saved_id not in saved_state:
                continue
            for key, value in saved_state[saved_id].items():
                if key != "step" and torch.is_tensor(value) and value.dtype == torch.float32:
                    self.state[p][key] = value.to(device=p.device)


def reject_differentiable(name: str, differentiable: bool) -> None:
    if differentiable:
        raise NotImplementedError(
            f"mechgpu.optim.{name} does not support differentiable=True (differentiating through the "
            f"optimizer step); use torch.optim.{name}(..., differentiable=True) for that"
        )
