"""Drop-in fused replacements for torch.optim.Adam, AdamW, RMSprop and SGD.

Change one import: ``from mechgpu.optim import AdamW``. Constructor signatures, defaults,
validation messages, param groups, state_dict layout and LR schedulers are torch's.
Differences from torch:

* two Triton launches per step for each (param group, dtype), whatever the number of tensors;
  the step counter lives on the device and ``step()`` never synchronises with the host;
* optimizer states are fp32 for bf16/fp16 params (torch keeps them in the param's dtype);
* extra keyword-only options: ``max_grad_norm`` and ``skip_nonfinite`` (clipping fused
  into the step), ``master_weights``, ``state_dtype``, ``stochastic_rounding``,
  ``track_update_norm`` and ``telemetry`` (see ``FusedOptimizer``); GradScaler's
  ``grad_scale``/``found_inf`` are applied in the kernel;
* ``foreach`` and ``fused`` are accepted and have no effect; ``capturable`` is always true
  in effect; ``differentiable=True`` raises NotImplementedError;
* params must be dense in memory (contiguous, or a permutation of it) with grads of the
  same dtype, shape and strides; float64 and complex params are rejected;
* CPU tensors run the kernels under ``TRITON_INTERPRET=1``, and otherwise fall back to
  torch.optim's own implementation with a one-time warning.
"""

from __future__ import annotations

import torch

from ..kernels import optim as optim_kernels
from ._fused import FusedOptimizer, StateKeyError, check_state_dict, reject_differentiable, telemetry_from_sums

#: keyword-only options every mechgpu optimizer adds to its torch twin's signature
MECHGPU_OPTIONS = ("max_grad_norm", "skip_nonfinite", "master_weights", "state_dtype", "stochastic_rounding",
                   "track_update_norm", "telemetry")

__all__ = ["Adam", "AdamW", "RMSprop", "SGD", "StateKeyError", "check_state_dict", "telemetry_from_sums"]


class _AdamFamily(FusedOptimizer):
    _hyper_keys = ("lr", "betas", "eps", "weight_decay")

    def _state_keys(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None)

    def _sparse_message(self):
        return "Adam does not support sparse gradients, please consider SparseAdam instead"

    def _launch(self, plan, dtype, group, aligned, control, precision):
        h = self._hypers(group, plan.device)
        beta1, beta2 = h["betas"]
        optim_kernels.launch(
            plan, dtype, optim_kernels.ADAM, lr=h["lr"], beta1=beta1, beta2=beta2, eps=h["eps"],
            weight_decay=h["weight_decay"],
            options={"AMSGRAD": group["amsgrad"], "MAXIMIZE": group["maximize"],
                     "DECOUPLED_WD": group["decoupled_weight_decay"]},
            aligned=aligned, control=control, precision=precision,
        )


class Adam(_AdamFamily, torch.optim.Adam):
    """Fused multi-tensor Adam; see the module docstring for how it differs from torch.optim.Adam."""

    _torch_name = "Adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, max_grad_norm=None, skip_nonfinite=False, master_weights=False,
                 state_dtype=torch.float32, stochastic_rounding=False, track_update_norm=False,
                 telemetry=False) -> None:
        reject_differentiable("Adam", differentiable)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=False, fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._init_mechgpu(max_grad_norm, skip_nonfinite, master_weights, state_dtype, stochastic_rounding,
                           track_update_norm, telemetry)


class AdamW(_AdamFamily, torch.optim.AdamW):
    """Fused multi-tensor AdamW; see the module docstring for how it differs from torch.optim.AdamW."""

    _torch_name = "AdamW"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, skip_nonfinite=False, master_weights=False, state_dtype=torch.float32,
                 stochastic_rounding=False, track_update_norm=False, telemetry=False) -> None:
        reject_differentiable("AdamW", differentiable)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, capturable=capturable,
                         differentiable=False, fused=fused)
        self._init_mechgpu(max_grad_norm, skip_nonfinite, master_weights, state_dtype, stochastic_rounding,
                           track_update_norm, telemetry)


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    """Fused multi-tensor RMSprop; see the module docstring for how it differs from torch.optim.RMSprop."""

    _hyper_keys = ("lr", "alpha", "eps", "weight_decay", "momentum")

    _torch_name = "RMSprop"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, max_grad_norm=None,
                 skip_nonfinite=False, master_weights=False, state_dtype=torch.float32,
                 stochastic_rounding=False, track_update_norm=False, telemetry=False) -> None:
        reject_differentiable("RMSprop", differentiable)
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered, capturable=capturable, foreach=foreach, maximize=maximize,
                         differentiable=False)
        self._init_mechgpu(max_grad_norm, skip_nonfinite, master_weights, state_dtype, stochastic_rounding,
                           track_update_norm, telemetry)

    def _state_keys(self, group):
        return ("square_avg", "momentum_buffer" if group["momentum"] > 0 else None,
                "grad_avg" if group["centered"] else None)

    def _sparse_message(self):
        return "RMSprop does not support sparse gradients"

    def _launch(self, plan, dtype, group, aligned, control, precision):
        h = self._hypers(group, plan.device)
        optim_kernels.launch(
            plan, dtype, optim_kernels.RMSPROP, lr=h["lr"], beta2=h["alpha"], eps=h["eps"],
            weight_decay=h["weight_decay"], momentum=h["momentum"],
            options={"CENTERED": group["centered"], "HAS_MOMENTUM": bool(group["momentum"] > 0),
                     "MAXIMIZE": group["maximize"]},
            aligned=aligned, control=control, precision=precision,
        )


class SGD(FusedOptimizer, torch.optim.SGD):
    """Fused multi-tensor SGD; see the module docstring for how it differs from torch.optim.SGD.

    Unlike torch.optim.SGD, sparse gradients are rejected.
    """

    _hyper_keys = ("lr", "momentum", "dampening", "weight_decay")
    _step_keys = ()  # torch's SGD state has no step: SGD counts in its own _sgd_steps
    _own_attrs = ("_sgd_steps",)
    _torch_name = "SGD"

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, max_grad_norm=None,
                 skip_nonfinite=False, master_weights=False, state_dtype=torch.float32,
                 stochastic_rounding=False, track_update_norm=False, telemetry=False) -> None:
        reject_differentiable("SGD", differentiable)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=False,
                         fused=fused)
        self._init_mechgpu(max_grad_norm, skip_nonfinite, master_weights, state_dtype, stochastic_rounding,
                           track_update_norm, telemetry)

    def _state_keys(self, group):
        return ("momentum_buffer" if group["momentum"] != 0 else None,)

    def _launch(self, plan, dtype, group, aligned, control, precision):
        h = self._hypers(group, plan.device)
        optim_kernels.launch(
            plan, dtype, optim_kernels.SGD, lr=h["lr"], weight_decay=h["weight_decay"], momentum=h["momentum"],
            dampening=h["dampening"],
            options={"HAS_MOMENTUM": bool(group["momentum"] != 0), "NESTEROV": group["nesterov"],
                     "MAXIMIZE": group["maximize"]},
            aligned=aligned, control=control, precision=precision,
        )

    def _required_keys(self, group):
        return ()  # torch's SGD makes a missing momentum buffer from the grad

    def _own_counters(self, params):
        counters = self.__dict__.get("_sgd_steps", {})
        return [counters.get(p) for p in params]

    def _step_counter(self, p):
        """A private count of p's steps: torch's SGD state has none, but the kernel must know
        a first momentum step (buffer <- grad) even when GradScaler skipped the last one."""
        counters = self.__dict__.setdefault("_sgd_steps", {})
        counter = counters.get(p)
        if counter is None:
            started = self.state[p].get("momentum_buffer") is not None  # e.g. loaded from a state_dict
            counter = torch.full((), float(started), dtype=torch.float32, device=p.grad.device)
            counters[p] = counter
        return counter

    def _ensure_state(self, p, group):
        if group["momentum"] != 0 and self.state[p].get("momentum_buffer") is None:
            self.__dict__.get("_sgd_steps", {}).pop(p, None)  # a new buffer starts a new count
        super()._ensure_state(p, group)

