"""mechgpu's own optimizer options, declared once: names, defaults, meaning and checks.

Every mechgpu optimizer takes torch's arguments plus these, keyword-only, and keeps each as a
plain attribute of the same name (a user may set it between steps; every step checks again).
"""

from __future__ import annotations

import dataclasses

import torch

from .quant8 import STATE_8BIT

STATE_DTYPES = (torch.float32, torch.bfloat16, STATE_8BIT)


@dataclasses.dataclass
class Options:
    """The keyword-only options every mechgpu optimizer adds to its torch twin's.

    * ``max_grad_norm``: clip the global grad norm (2-norm over all params of all groups)
      inside the step: one norm launch, then the update kernel multiplies each grad by
      the clip coefficient in registers. Unlike ``torch.nn.utils.clip_grad_norm_``, the
      grads themselves are not rescaled. The norm before clipping is ``last_grad_norm``.
    * ``skip_nonfinite``: with ``max_grad_norm``, a step whose grad norm is inf or NaN
      leaves params and states untouched (and is not counted), without a host sync.
    * ``master_weights``: bf16/fp16 params get an fp32 master copy in the optimizer state
      (``master_param``); the kernel updates it and writes the rounded param in one pass.
      The param is read too (2 B per element): where it was edited since the last step (a
      hook's clamp, ``load_state_dict``, steps with master_weights off), the edit seeds the master.
    * ``state_dtype``: ``torch.float32`` (default), ``torch.bfloat16`` or ``"8bit"`` optimizer
      states. ``"8bit"``: block-wise quantized states (``mechgpu.optim.quant8``; the scheme is
      ``mechgpu.kernels.quant8``'s), dequantized, updated and requantized in registers by the same
      one-launch step: 1 B per state element plus an fp32 absmax per 128 elements. Tensors under
      ``MIN_8BIT_NUMEL`` (4,096) elements keep fp32 states, as bitsandbytes' ``min_8bit_size``.
      ``state_dict()`` holds each 8-bit state as uint8 codes (``key``, the param's shape) and fp32
      block maxima (``key + "_absmax"``); ``dequantized_state_dict`` turns it into torch's layout,
      and ``load_state_dict`` of a torch (fp32) state_dict quantizes it at the next step.
      Under FSDP2 (DTensor params) the threshold is the param's global numel, so every rank
      quantizes the same params, and each rank's blocks start at its own shard: the codes and
      block maxima are the local shard's, plain tensors. Each rank's ``state_dict()`` saved and
      loaded by that rank round-trips; ``torch.distributed.checkpoint``, which takes a plain tensor
      for a replicated one and would keep one rank's codes, is not supported with 8-bit states.
      RMSprop's ``centered=True`` is refused with it (``OptimizerSpec.not_8bit`` says why).
    * ``stochastic_rounding``: bf16 params without master weights are rounded
      stochastically, so small updates are not lost to round-to-nearest.
    * ``track_update_norm``: ``last_update_norm``, ||p_after - p_before|| over every param the
      step updated (in fp32 master space where there are masters), summed by the update
      kernel from the values it has in registers: no extra pass, no host sync.
    * ``telemetry``: the same sums give ``last_telemetry``, per param group: ||p|| before the
      update, ||p_after - p_before|| and their ratio, the non-finite grads (counted even when
      the step is then skipped), and for params stored in bf16/fp16 without masters the
      fraction of changed elements whose update was lost to rounding.
    """

    max_grad_norm: float | None = None
    skip_nonfinite: bool = False
    master_weights: bool = False
    state_dtype: torch.dtype = torch.float32
    stochastic_rounding: bool = False
    track_update_norm: bool = False
    telemetry: bool = False

    def check(self) -> None:
        """Raise ValueError naming the first option that is out of range or contradicts another."""
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {self.max_grad_norm}")
        if self.skip_nonfinite and self.max_grad_norm is None:
            raise ValueError("skip_nonfinite=True needs max_grad_norm (the norm is what is checked)")
        if not any(self.state_dtype is d or (type(self.state_dtype) is type(d) and self.state_dtype == d)
                   for d in STATE_DTYPES):
            raise ValueError(f"Invalid state_dtype: {self.state_dtype!r}; use torch.float32, torch.bfloat16 "
                             f"or {STATE_8BIT!r}")
        if self.stochastic_rounding and self.master_weights:
            raise ValueError("stochastic_rounding applies to bf16 params without master weights; "
                             "with master_weights=True the params are rounded from an fp32 copy")


#: The options' names, in declaration order (the constructors' keyword-only tail)
NAMES = tuple(f.name for f in dataclasses.fields(Options))
DEFAULTS = Options()
