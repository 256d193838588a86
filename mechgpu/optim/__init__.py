"""Drop-in fused replacements for torch.optim.Adam, AdamW, RMSprop, SGD and Adagrad.

Change one import: ``from mechgpu.optim import AdamW``. Constructor signatures, defaults,
validation messages, param groups, state_dict layout and LR schedulers are torch's.
Differences from torch:

* two Triton launches per step for each (param group, dtype), whatever the number of tensors;
  the step counter lives on the device and ``step()`` never synchronises with the host;
* optimizer states are fp32 for bf16/fp16 params (torch keeps them in the param's dtype);
  ``state_dtype="8bit"`` keeps them block-wise quantized (``quant8``: 1 B per element plus an
  fp32 absmax per 128; tensors under 4,096 elements keep fp32), and ``state_dict()`` then holds
  codes and absmax, which ``dequantized_state_dict`` turns into torch's layout;
* extra keyword-only options (``Options``): ``max_grad_norm`` and ``skip_nonfinite`` (clipping
  fused into the step), ``master_weights``, ``state_dtype``, ``stochastic_rounding``,
  ``track_update_norm`` and ``telemetry``; GradScaler's ``grad_scale``/``found_inf`` are
  applied in the kernel;
* ``foreach`` and ``fused`` are accepted silently and have no effect (the step is always
  mechgpu's multi-tensor kernels), so code written for torch's ``fused=True`` or
  ``foreach=False`` runs unchanged; ``capturable`` is always true in effect;
  ``differentiable=True`` raises NotImplementedError; sparse gradients are rejected (torch's
  SGD and Adagrad take them);
* params must be dense in memory (contiguous, or a permutation of it) with grads of the
  same dtype, shape and strides; float64 and complex params are stepped by torch.optim's own
  implementation, with a one-time warning;
* CPU tensors run the kernels under ``TRITON_INTERPRET=1``, and otherwise fall back to
  torch.optim's own implementation with a one-time warning;
* ``repr(optimizer)`` lists mechgpu's options after torch's param groups.

``weight_decay_groups(model, weight_decay)`` builds the param groups of Hugging Face's
``Trainer``: no weight decay for biases and norm weights.

Each class is made from its record in ``mechgpu.kernels.optim_spec.SPECS``.
"""

from __future__ import annotations

from ..kernels.optim_spec import SPECS
from ._fused import FusedOptimizer, StateKeyError, telemetry_from_sums
from ._state_dict import check_state_dict
from .groups import weight_decay_groups
from .options import NAMES as MECHGPU_OPTIONS
from .options import Options
from .quant8 import dequantized_state_dict


def _optimizer_class(spec) -> type[FusedOptimizer]:
    doc = (f"Fused multi-tensor {spec.name}: ``torch.optim.{spec.name}``'s arguments, then mechgpu's "
           "keyword-only ``Options``; see the module docstring for how it differs from torch's.")
    return type(spec.name, (FusedOptimizer, spec.torch_class),
                {"__doc__": doc, "__module__": __name__, "_spec": spec, "__qualname__": spec.name})


_CLASSES = {name: _optimizer_class(spec) for name, spec in SPECS.items()}
globals().update(_CLASSES)

__all__ = [*_CLASSES, "MECHGPU_OPTIONS", "Options", "StateKeyError", "check_state_dict", "dequantized_state_dict",
           "telemetry_from_sums", "weight_decay_groups"]
