"""Bytes each operation must move per element, mechgpu against torch's equivalents.

The least global-memory traffic (reads + writes) per element, fp32 unless stated, taken
from the kernels (their docstrings in ``kernels/``) and from torch 2.13's own code paths
(``torch/optim/adam.py`` ``_multi_tensor_adam`` and friends, ``torch/nn/utils/clip_grad.py``).
A temporary that torch allocates and reads back counts like any other tensor.
Memory-bound kernels are judged by these numbers: the benchmarks divide them by the
measured time and report the fraction of copy bandwidth. The README's table is made from
``TABLE`` by ``mechgpu bench --readme``.
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4

# One fused pass of each optimizer over fp32 params (kernels/optim.py):
ADAM_STEP = 7 * FP32  # read p, g, exp_avg, exp_avg_sq; write p, exp_avg, exp_avg_sq
ADAM_AMSGRAD_STEP = 9 * FP32  # + read and write max_exp_avg_sq
SGD_MOMENTUM_STEP = 5 * FP32  # read p, g, momentum_buffer; write p, momentum_buffer
RMSPROP_STEP = 5 * FP32  # read p, g, square_avg; write p, square_avg
# Clipping (kernels/clip.py):
GRAD_NORM = FP32  # the multi-tensor norm reads every grad once
GRAD_SCALE = 2 * FP32  # scaling the grads in place reads and writes them

#: Bytes per element moved by one optimizer step over fp32 params, by optimizer name.
STEP_BYTES = {"Adam": ADAM_STEP, "AdamW": ADAM_STEP, "SGD": SGD_MOMENTUM_STEP, "RMSprop": RMSPROP_STEP}


@dataclass(frozen=True)
class Traffic:
    operation: str
    mechgpu: float
    torch_fused: float | None  # torch's single-kernel path (fused=True), None where torch has none
    torch_foreach: float | None  # torch's default multi-tensor or eager path
    note: str


# torch foreach Adam: lerp_(m, g) 12 + mul_(v) 8 + addcmul_(v, g, g) 16 + sqrt(v) into a temporary 8
# + div_ 8 + add_(eps) 8 + addcdiv_(p, m, tmp) 16 = 76; AdamW first decays p: mul_(p) 8 more.
TORCH_FOREACH_ADAM = 76
TABLE: tuple[Traffic, ...] = (
    Traffic("Adam step", ADAM_STEP, ADAM_STEP, TORCH_FOREACH_ADAM,
            "one pass; foreach takes 7 passes and a temporary"),
    Traffic("AdamW step", ADAM_STEP, ADAM_STEP, TORCH_FOREACH_ADAM + 8,
            "weight decay applied in registers; foreach decays p in an extra pass"),
    Traffic("Adam step, amsgrad", ADAM_AMSGRAD_STEP, ADAM_AMSGRAD_STEP, TORCH_FOREACH_ADAM + 12,
            "foreach adds maximum_(max_v, v)"),
    Traffic("SGD step, momentum", SGD_MOMENTUM_STEP, SGD_MOMENTUM_STEP, 32,
            "foreach: mul_(buf) 8 + add_(buf, g) 12 + add_(p, buf) 12"),
    Traffic("RMSprop step", RMSPROP_STEP, None, 56,
            "torch has no fused RMSprop; foreach: mul_ 8 + addcmul_ 16 + sqrt 8 + add_ 8 + addcdiv_ 16"),
    Traffic("AdamW + clip to max norm", ADAM_STEP + GRAD_NORM, ADAM_STEP + GRAD_NORM + GRAD_SCALE,
            TORCH_FOREACH_ADAM + 8 + GRAD_NORM + GRAD_SCALE,
            "`max_grad_norm=`: the norm reads g once and the step scales g in registers; torch's "
            "clip_grad_norm_ reads g, then reads and writes it, then steps"),
    Traffic("clip_grad_norm_ alone", GRAD_NORM + GRAD_SCALE, None, GRAD_NORM + GRAD_SCALE,
            "same bytes; one launch per pass for any number of tensors, fp64 across blocks"),
    Traffic("ReLU forward (bf16)", 2 * 2 + 1 / 8, None, 2 * 2,
            "mechgpu also writes the 1-bit mask it saves for backward"),
    Traffic("ReLU saved for backward (bf16)", 1 / 8, None, 2,
            "a bit-packed mask instead of the output: 16x less activation memory"),
    Traffic("ReLU backward (bf16)", 2 * 2 + 1 / 8, None, 3 * 2, "reads grad and the mask, writes grad_in"),
    Traffic("GELU / SiLU forward + backward (bf16)", 5 * 2, None, 5 * 2,
            "both save the input; the same bytes as torch eager"),
    Traffic("normal_ / uniform_ / kaiming / xavier init", FP32, None, FP32,
            "the same bytes; init_model fills every layer in one launch"),
    Traffic("trunc_normal_ init", FP32, None, FP32 + 14,
            "torch: normal_ 4, then each rejection round builds a bool mask (x < lo 5, x > hi 5, or 3), "
            "reads it in mask.any() 1 and syncs with the host; mechgpu inverts the truncated CDF in registers"),
)


def bytes_text(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:g} B" if value == int(value) else f"{value:.3f} B"


def markdown() -> str:
    """The table of ``TABLE``, as markdown."""
    lines = ["| operation | mechgpu | torch fused | torch foreach / eager | how |",
             "|:---|---:|---:|---:|:---|"]
    for t in TABLE:
        lines.append(f"| {t.operation} | {bytes_text(t.mechgpu)} | {bytes_text(t.torch_fused)} | "
                     f"{bytes_text(t.torch_foreach)} | {t.note} |")
    return "\n".join(lines)
