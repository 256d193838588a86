"""The shared step of every mechgpu optimizer: validate, group, build tables, launch.

Each optimizer subclasses its ``torch.optim`` twin, so the constructor, its validation
messages, ``param_groups``, ``add_param_group``, ``zero_grad``, ``state_dict`` and
scheduler hooks are torch's own. ``step`` is ours, and ``load_state_dict`` keeps the
optimizer states in their own dtype (torch casts them to the param's).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable

import torch

from .._backend import PLAIN_TENSORS, is_dense, kernels_run_on, warn_fallback_once
from .._backend import local as _local
from ..kernels.multi_tensor import COL_GRAD, COL_NUMEL, MultiTensorPlan
from ..kernels.optim import Precision, StepControl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)
MASTER_KEY = "master_param"


def _warn_cpu_fallback(name: str) -> None:
    warn_fallback_once(
        "optim",
        f"mechgpu.optim.{name}: parameters are on the CPU and TRITON_INTERPRET=1 is not set, so "
        f"this step runs torch.optim.{name}'s own implementation instead of mechgpu's Triton "
        "kernel. Move the model to CUDA, or set TRITON_INTERPRET=1 before importing triton to "
        "run the kernels on the CPU (slowly).",
        stacklevel=4,
    )


class _Bucket:
    """One launch: the tensors of a group with one dtype and one alignment."""

    __slots__ = ("plan", "dtype", "aligned", "precision", "indices")

    def __init__(self, plan, dtype, aligned, precision, indices):
        self.plan, self.dtype, self.aligned, self.precision, self.indices = plan, dtype, aligned, precision, indices


class _GroupCache:
    """A param group's launches, kept while its params and states stay where they are.

    A step whose grads are the very same tensors at the same addresses launches straight
    away; new grad tensors (zero_grad(set_to_none=True)) only have their checks redone and
    their table column uploaded. Anything else (another param set, a param moved, a grad
    that lost 16-byte alignment) rebuilds the cache.
    """

    def __init__(self, params: list[torch.Tensor], buckets: list[_Bucket]) -> None:
        self.params = params
        self.buckets = buckets
        self.plain = all(type(p) in PLAIN_TENSORS and type(p.grad) in PLAIN_TENSORS for p in params)
        self.grads = [p.grad for p in params]
        self.param_ptrs = self._pointers(params)
        self.grad_ptrs = self._pointers(self.grads)
        self.meta = [(p.dtype, _local(p).shape, _local(p).stride(), _local(p).get_device()) for p in params]

    def _pointers(self, tensors: list[torch.Tensor]) -> list[int]:
        if self.plain:
            return list(map(torch.Tensor.data_ptr, tensors))
        return [_local(t).data_ptr() for t in tensors]

    def _same_params(self, params: list[torch.Tensor]) -> bool:
        return (len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                and self._pointers(params) == self.param_ptrs)

    def serves(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
        """Same params and the same grad tensors, all where they were: launch as is."""
        return (self._same_params(params) and all(map(operator.is_, grads, self.grads))
                and self._pointers(grads) == self.grad_ptrs)

    def takes_new_grads(self, optimizer, group_index, group, params, grads) -> bool:
        """Same params, new grads: check them and point the grad column at them, if that is all."""
        if not self._same_params(params):
            return False
        strided = torch.strided
        for g, (dtype, shape, stride, device) in zip(grads, self.meta):
            local = g if self.plain else _local(g)
            if (local.layout is not strided or local.dtype is not dtype or local.shape != shape
                    or local.stride() != stride or local.get_device() != device):
                optimizer._check_group(group_index, group, params)  # raises with the details
                return False
        grad_ptrs = self._pointers(grads)
        for bucket in self.buckets:
            if bucket.aligned and any(grad_ptrs[i] % 16 for i in bucket.indices):
                return False
        self.grads, self.grad_ptrs = grads, grad_ptrs
        return True

    def launch_tables(self, bucket: _Bucket) -> None:
        """Point bucket's table at this step's grads (an upload only if they moved)."""
        bucket.plan.set_column(COL_GRAD, [self.grad_ptrs[i] for i in bucket.indices])


class FusedOptimizer:
    """Mixin placed before the torch optimizer class in the MRO.

    mechgpu options beyond torch's (keyword-only in every optimizer):

    * ``max_grad_norm``: clip the global grad norm (2-norm over all params of all groups)
      inside the step: one norm launch, then the update kernel multiplies each grad by
      the clip coefficient in registers. Unlike ``torch.nn.utils.clip_grad_norm_``, the
      grads themselves are not rescaled. The norm before clipping is ``last_grad_norm``.
    * ``skip_nonfinite``: with ``max_grad_norm``, a step whose grad norm is inf or NaN
      leaves params and states untouched (and is not counted), without a host sync.
    * ``master_weights``: bf16/fp16 params get an fp32 master copy in the optimizer state
      (``master_param``); the kernel updates it and writes the rounded param in one pass.
      The param is not read: to change it from outside, change the master too.
    * ``state_dtype``: ``torch.float32`` (default) or ``torch.bfloat16`` optimizer states.
    * ``stochastic_rounding``: bf16 params without master weights are rounded
      stochastically, so small updates are not lost to round-to-nearest.
    * ``track_update_norm``: each kernel program adds its block's sum of squared updates
      to a device scalar, so ``last_update_norm`` (||p_after - p_before|| over every param
      the step updated, in fp32 master space where there are masters) costs no extra pass.
    """

    _torch_name = ""
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale and found_inf

    def _state_keys(self, group: dict) -> tuple[str | None, ...]:
        raise NotImplementedError

    def _launch(self, plan: MultiTensorPlan, dtype: torch.dtype, group: dict, aligned: bool,
                control: StepControl, precision: Precision) -> None:
        raise NotImplementedError

    def _init_mechgpu(self, max_grad_norm: float | None, skip_nonfinite: bool, master_weights: bool,
                      state_dtype: torch.dtype, stochastic_rounding: bool, track_update_norm: bool) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}")
        if skip_nonfinite and max_grad_norm is None:
            raise ValueError("skip_nonfinite=True needs max_grad_norm (the norm is what is checked)")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {state_dtype}; use torch.float32 or torch.bfloat16")
        if stochastic_rounding and master_weights:
            raise ValueError("stochastic_rounding applies to bf16 params without master weights; "
                             "with master_weights=True the params are rounded from an fp32 copy")
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.master_weights = master_weights
        self.state_dtype = state_dtype
        self.stochastic_rounding = stochastic_rounding
        self._rounding_seed = int(torch.randint(0, 2**30, ())) if stochastic_rounding else 0
        self._clip_out: torch.Tensor | None = None
        self.track_update_norm = track_update_norm
        self._update_sq: torch.Tensor | None = None

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The global grad norm of the last step, before clipping (with max_grad_norm set).

        A 0-d view of a device buffer that each step overwrites; reading it is the only sync.
        """
        return None if self._clip_out is None else self._clip_out[0]

    @property
    def last_update_norm(self) -> torch.Tensor | None:
        """||p_after - p_before|| of the last step (with track_update_norm), as a device tensor."""
        return None if self._update_sq is None else self._update_sq.sqrt().float()

    # ------------------------------------------------------------------------------
    def _error(self, message: str, exc=RuntimeError):
        return exc(f"mechgpu.optim.{self._torch_name}: {message}")

    def _sparse_message(self) -> str:
        return f"mechgpu.optim.{self._torch_name} does not support sparse gradients"

    def _check_group(self, group_index: int, group: dict, params: list[torch.Tensor]) -> None:
        """Every check that can fail, before anything is written."""
        device = _local(params[0]).device
        for i, param in enumerate(params):
            p, g = _local(param), _local(param.grad)
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
            if not is_dense(p):
                raise self._error(f"{where} is not contiguous (shape {tuple(p.shape)}, stride {p.stride()}); "
                                  "pass contiguous parameters")
            if g.stride() != p.stride():
                raise self._error(f"the grad of {where} has stride {g.stride()}, its param {p.stride()}; "
                                  "grads must share their param's memory layout")
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device != device and lr.device.type != "cpu":
            raise self._error(f"group {group_index}'s tensor lr is on {lr.device}, its params on {device}")

    def _step_counter(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 device scalar the kernel counts p's steps in (torch's state['step'])."""
        state = self.state[p]
        step = state.get("step")
        if step is None:
            step = torch.zeros((), dtype=torch.float32, device=_local(p).device)
        elif not torch.is_tensor(step):
            step = torch.tensor(float(step), dtype=torch.float32, device=_local(p).device)
        elif step.device != _local(p).device or step.dtype != torch.float32:
            step = step.to(device=_local(p).device, dtype=torch.float32)
        state["step"] = step
        return step

    def _uses_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype != torch.float32

    def _ensure_state(self, p: torch.Tensor, group: dict) -> None:
        """Create or repair p's state for the kernel (state dtype, step on p's device)."""
        self._step_counter(p)  # first, so the state's keys come in torch's order
        state = self.state[p]
        local = _local(p)
        for key in self._state_keys(group):
            if key is None:
                continue
            buf = state.get(key)
            if buf is None:
                state[key] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
            elif (buf.dtype != self.state_dtype or _local(buf).device != local.device
                  or _local(buf).stride() != local.stride()):
                fixed = torch.empty_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
                state[key] = fixed.copy_(buf)
        if self._uses_master(p) and MASTER_KEY not in state:
            state[MASTER_KEY] = torch.empty_like(p, dtype=torch.float32,
                                                 memory_format=torch.preserve_format).copy_(p)

    def _hyper(self, value, device: torch.device):
        """A tensor hyperparameter on the params' device is read by the kernel; a CPU one is a float."""
        if isinstance(value, torch.Tensor) and value.device != device:
            return float(value)  # a CPU tensor: no device synchronisation
        return value

    # ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One optimisation step: one kernel launch per (param group, dtype), plus one norm
        launch with ``max_grad_norm``. Never synchronises with the host."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        fallback_groups = []
        for group_index, group in enumerate(self.param_groups):
            params, grads = [], []
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    params.append(p)
                    grads.append(g)
            if not params:
                continue
            cache = self._group_caches.get(group_index)
            if cache is not None and cache.serves(params, grads):
                work.append((group_index, group, params, cache))
                continue
            if cache is not None and not cache.takes_new_grads(self, group_index, group, params, grads):
                cache = None
            if cache is None:
                self._check_group(group_index, group, params)
                if not kernels_run_on(_local(params[0]).device):
                    fallback_groups.append(group)
                    continue
            work.append((group_index, group, params, cache))
        devices = {_local(params[0]).device for _, _, params, _ in work}
        if self.max_grad_norm is not None and len(devices) > 1:
            raise self._error(f"max_grad_norm needs all params on one device; they are on {sorted(map(str, devices))}")

        if fallback_groups:
            _warn_cpu_fallback(self._torch_name)
            self._torch_step(fallback_groups)
        if not work:
            return loss

        device = devices.pop()
        control = StepControl(grad_scale=self._amp_tensor("grad_scale", device),
                              found_inf=self._amp_tensor("found_inf", device))
        if self.max_grad_norm is not None:
            from ..clip import total_norm_into

            if self._clip_out is None or self._clip_out.device != device:
                self._clip_out = torch.zeros(2, dtype=torch.float32, device=device)
            grads = [p.grad for _, _, params, _ in work for p in params]
            total_norm_into(self._clip_out, grads, 2.0, float(self.max_grad_norm), control.grad_scale)
            control.clip = self._clip_out
            control.skip_nonfinite = self.skip_nonfinite
        if self.track_update_norm:
            if self._update_sq is None or self._update_sq.device != device:
                self._update_sq = torch.zeros((), dtype=torch.float64, device=device)
            else:
                self._update_sq.zero_()
            control.update_sq = self._update_sq
        for group_index, group, params, cache in work:
            if cache is None:
                cache = self._group_caches[group_index] = self._build_cache(group_index, group, params)
            for bucket in cache.buckets:
                cache.launch_tables(bucket)
                self._launch(bucket.plan, bucket.dtype, group, bucket.aligned, control, bucket.precision)
        return loss

    def _amp_tensor(self, name: str, device: torch.device) -> torch.Tensor | None:
        value = getattr(self, name, None)  # set by torch.amp.GradScaler.step
        if value is None:
            return None
        return value.to(device=device, dtype=torch.float32, non_blocking=True)

    @property
    def _group_caches(self) -> dict:
        return self.__dict__.setdefault("_mechgpu_group_caches", {})

    def _build_cache(self, group_index: int, group: dict, params: list[torch.Tensor]) -> _GroupCache:
        """States made or repaired, params sorted into (dtype, alignment) buckets, tables built."""
        keys = self._state_keys(group)
        by_bucket: dict[tuple[torch.dtype, bool], list[int]] = {}
        rows = []
        for index, p in enumerate(params):
            self._ensure_state(p, group)
            state = self.state[p]
            local = _local(p)
            ptrs = [local.data_ptr(), _local(p.grad).data_ptr()]
            ptrs += [_local(state[k]).data_ptr() if k is not None else 0 for k in keys]
            master = _local(state[MASTER_KEY]).data_ptr() if self._uses_master(p) else 0
            aligned = all(ptr % 16 == 0 for ptr in ptrs) and master % 16 == 0
            ptrs += [0] * (5 - len(ptrs))
            rows.append(ptrs + [self._step_counter(p).data_ptr(), local.numel(), master])
            by_bucket.setdefault((p.dtype, aligned), []).append(index)

        device = _local(params[0]).device
        old = self._group_caches.get(group_index)
        old_plans = {} if old is None else {(b.dtype, b.aligned): b.plan for b in old.buckets}
        buckets = []
        for (dtype, aligned), indices in by_bucket.items():
            numels = [rows[i][COL_NUMEL] for i in indices]
            plan = old_plans.get((dtype, aligned))
            if plan is None or plan.numels != numels or plan.device != device:
                plan = MultiTensorPlan(numels, device)
            precision = Precision(state_dtype=self.state_dtype, master=self._uses_master(params[indices[0]]),
                                  stochastic=self.stochastic_rounding and dtype == torch.bfloat16,
                                  seed=self._rounding_seed)
            plan.set_rows([rows[i] for i in indices])
            buckets.append(_Bucket(plan, dtype, aligned, precision, indices))
        return _GroupCache(params, buckets)

    def _torch_step(self, groups: list[dict]) -> None:
        """torch.optim's own step, for CPU params when the kernels cannot run there."""
        torch_cls = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.optim"))
        fn = torch_cls.step
        if getattr(fn, "hooked", False):  # torch's profiling/hook wrapper: our own step already ran the hooks
            fn = fn.__wrapped__
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item():  # GradScaler found inf/NaN: skip, like fused torch
            return
        grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
        if grad_scale is not None:
            for grad in grads:
                grad.div_(grad_scale.to(grad.device))
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(grads and [p for g in groups for p in g["params"]],
                                                  self.max_grad_norm)
            self._clip_out = torch.stack([norm.float(), torch.ones_like(norm, dtype=torch.float32)])
            if self.skip_nonfinite and not torch.isfinite(norm):
                return
        saved_groups = self.param_groups
        saved_capturable = [g.get("capturable") for g in groups]
        try:
            self.param_groups = groups
            for g in groups:
                if "capturable" in g:
                    g["capturable"] = False  # torch's capturable path rejects CPU tensors
            for name in ("grad_scale", "found_inf"):
                self.__dict__.pop(name, None)
            fn(self)
        finally:
            self.param_groups = saved_groups
            for g, c in zip(groups, saved_capturable):
                if c is not None:
                    g["capturable"] = c
            if grad_scale is not None:
                self.grad_scale, self.found_inf = grad_scale, found_inf

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, but states keep their saved dtype (torch casts to the param's)."""
        saved_state = state_dict["state"]
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        super().load_state_dict(state_dict)
        self._group_caches.clear()  # state tensors were replaced
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            for key, value in saved_state[saved_id].items():
                if key != "step" and torch.is_tensor(value) and value.dtype != p.dtype:
                    self.state[p][key] = value.to(device=_local(p).device)


def reject_differentiable(name: str, differentiable: bool) -> None:
    if differentiable:
        raise NotImplementedError(
            f"mechgpu.optim.{name} does not support differentiable=True (differentiating through the "
            f"optimizer step); use torch.optim.{name}(..., differentiable=True) for that"
        )
