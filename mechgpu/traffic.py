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

from .kernels.optim_spec import SPECS
from .kernels.quant8 import QUANT_BLOCK, absmax_count

FP32 = 4
BF16 = 2
MASK_BYTES = 1 / 8  # a bit-packed mask: one bit per element
#: bytes per element of an 8-bit state (``state_dtype="8bit"``): a uint8 code, plus one fp32 absmax per
#: QUANT_BLOCK elements (exact for tensors whose size QUANT_BLOCK divides; more for a partial last block)
STATE_8BIT = 1 + FP32 / QUANT_BLOCK

def state_8bit_size(numel: int) -> float:
    """Bytes per element of one state of a tensor of ``numel`` elements under ``state_dtype="8bit"``:
    ``STATE_8BIT`` where QUANT_BLOCK divides ``numel`` (a partial last block keeps a whole absmax), and
    FP32 for a tensor under ``MIN_8BIT_NUMEL``, which keeps fp32 states. The state_size of
    ``optimizer_step_bytes`` for a list of tensors of mixed sizes, one tensor at a time."""
    from .optim.quant8 import MIN_8BIT_NUMEL  # the optimizer's own threshold

    if numel < MIN_8BIT_NUMEL:
        return FP32
    return 1 + FP32 * absmax_count(numel) / numel


def optimizer_step_bytes(optimizer: str, param_size: int = FP32, state_size: float = FP32, *, master: bool = False,
                         **options) -> float:
    """The least one step of ``optimizer`` reads and writes per parameter element.

    With P the param size (the grad has the param's dtype) and S a state's: g is read (P) and
    the param read and written (2P); with an fp32 master copy the master is read and written
    too (8), the param read only to see whether it was edited since the last step. Each state
    the options make (as the optimizer's ``optim_spec`` record declares them) is read and written
    (2S). So 3P + 2S * states, + 8 with masters: fp32 Adam 28 B, bf16 params with fp32 states
    22 B, with bf16 states 14 B, bf16 with masters 30 B; SGD without momentum 12 B. With 8-bit
    states S is ``STATE_8BIT`` (codes and block maxima are both read and written): fp32 AdamW
    16.125 B.
    ``options`` are the optimizer's torch options (amsgrad, momentum, centered); those that make no
    state are ignored.
    """
    params = 3 * param_size + (2 * FP32 if master else 0)
    return params + 2 * state_size * SPECS[optimizer].state_count(options)


#: Per tensor and step, beside the per-element stream: the step prologue (kernels/optim.py) reads
#: the step counter's address (8) and the step (4), and writes the step (4) and the tensor's four
#: fp32 scalars (16), which the update kernel reads once per block.
STEP_PROLOGUE_BYTES_PER_TENSOR = 32


def optimizer_state_bytes(optimizer: str, state_size: float = FP32, *, master: bool = False,
                          **options) -> float:
    """Optimizer state kept between steps per parameter element: each state buffer, plus the
    fp32 master copy when there is one."""
    return state_size * SPECS[optimizer].state_count(options) + (FP32 if master else 0)


def grad_norm_bytes(element_size: int = FP32) -> int:
    """The multi-tensor norm (kernels/clip.py) reads every grad element once."""
    return element_size


def grad_scale_bytes(element_size: int = FP32) -> int:
    """Scaling grads in place reads and writes each element."""
    return 2 * element_size


def fill_bytes(element_size: int = FP32) -> int:
    """A random fill (kernels/init.py) writes each element and reads nothing."""
    return element_size


def activation_bytes(kind: str, direction: str, element_size: int, *, mask: bool | None = None) -> float:
    """The least an activation moves per element: forward reads x and writes y (plus the bit
    mask relu and leaky_relu save); backward reads g and what was saved (the mask, or x or y)
    and writes dx. ``mask`` overrides whether a bit mask is saved (torch saves a tensor)."""
    from .kernels.activation import MASK_KINDS  # the kinds that save a bit mask

    mask = kind in MASK_KINDS if mask is None else mask
    forward = 2 * element_size + (MASK_BYTES if mask else 0)
    backward = 2 * element_size + (MASK_BYTES if mask else element_size)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[direction]


# One fused pass of each optimizer over fp32 params, and clipping:
ADAM_STEP = optimizer_step_bytes("Adam")
ADAM_AMSGRAD_STEP = optimizer_step_bytes("Adam", amsgrad=True)
SGD_MOMENTUM_STEP = optimizer_step_bytes("SGD", momentum=0.9)
RMSPROP_STEP = optimizer_step_bytes("RMSprop")
ADAGRAD_STEP = optimizer_step_bytes("Adagrad")
GRAD_NORM = grad_norm_bytes()
GRAD_SCALE = grad_scale_bytes()

#: Bytes per element moved by one optimizer step over fp32 params, by optimizer name.
STEP_BYTES = {"Adam": ADAM_STEP, "AdamW": ADAM_STEP, "SGD": SGD_MOMENTUM_STEP, "RMSprop": RMSPROP_STEP,
              "Adagrad": ADAGRAD_STEP}


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
    Traffic("Adagrad step", ADAGRAD_STEP, None, 56,
            "torch's fused Adagrad is CPU-only; foreach: addcmul_ 16 + sqrt 8 + add_ 8 + mul 8 + addcdiv_ 16"),
    Traffic("AdamW + clip to max norm", ADAM_STEP + GRAD_NORM, ADAM_STEP + GRAD_NORM + GRAD_SCALE,
            TORCH_FOREACH_ADAM + 8 + GRAD_NORM + GRAD_SCALE,
            "`max_grad_norm=`: the norm reads g once and the step scales g in registers; torch's "
            "clip_grad_norm_ reads g, then reads and writes it, then steps"),
    Traffic("AdamW + clip, bf16 states", optimizer_step_bytes("AdamW", FP32, BF16) + GRAD_NORM,
            ADAM_STEP + GRAD_NORM + GRAD_SCALE, None, "fp32 params; `state_dtype=torch.bfloat16`"),
    Traffic("AdamW + clip, 8-bit states", optimizer_step_bytes("AdamW", FP32, STATE_8BIT) + GRAD_NORM,
            ADAM_STEP + GRAD_NORM + GRAD_SCALE, None,
            f"fp32 params; `state_dtype=\"8bit\"`: 1 B codes + an fp32 absmax per {QUANT_BLOCK}, "
            "dequantized and requantized in registers"),
    Traffic("clip_grad_norm_ alone", GRAD_NORM + GRAD_SCALE, None, GRAD_NORM + GRAD_SCALE,
            "same bytes; one launch per pass for any number of tensors, fp64 across blocks"),
    Traffic("ReLU forward (bf16)", activation_bytes("relu", "forward", 2), None,
            activation_bytes("relu", "forward", 2, mask=False),
            "mechgpu also writes the 1-bit mask it saves for backward"),
    Traffic("ReLU saved for backward (bf16)", MASK_BYTES, None, 2,
            "a bit-packed mask instead of the output: 16x less activation memory"),
    Traffic("ReLU backward (bf16)", activation_bytes("relu", "backward", 2), None,
            activation_bytes("relu", "backward", 2, mask=False), "reads grad and the mask, writes grad_in"),
    Traffic("GELU / SiLU forward + backward (bf16)", activation_bytes("gelu", "forward+backward", 2), None,
            activation_bytes("gelu", "forward+backward", 2), "both save the input; the same bytes as torch eager"),
    Traffic("normal_ / uniform_ / kaiming / xavier init", fill_bytes(), None, fill_bytes(),
            "the same bytes; init_model fills every layer in one launch"),
    Traffic("trunc_normal_ init", fill_bytes(), None, fill_bytes() + 14,
            "torch: normal_ 4, then each rejection round builds a bool mask (x < lo 5, x > hi 5, or 3), "
            "reads it in mask.any() 1 and syncs with the host; mechgpu inverts the truncated CDF in registers"),
)


#: mechgpu's precision modes for an Adam/AdamW step: (mode, param bytes, state bytes, fp32 master,
#: what torch keeps for the same params: its states take the param's dtype, with no master)
PRECISION_MODES = (
    ("fp32 params", 4, 4, False, True),
    ("bf16 params, fp32 states", 2, 4, False, True),
    ("bf16 params, bf16 states (`state_dtype=torch.bfloat16`)", 2, 2, False, False),
    ("bf16 params + fp32 masters (`master_weights=True`)", 2, 4, True, False),
    ("fp32 params, 8-bit states (`state_dtype=\"8bit\"`)", 4, STATE_8BIT, False, False),
    ("bf16 params + fp32 masters, 8-bit states", 2, STATE_8BIT, True, False),
    ("bf16 + stochastic rounding", 2, 4, False, False),
    ("fp16 + fp32 masters + GradScaler", 2, 4, True, False),
)


def precision_markdown() -> str:
    """Bytes an Adam/AdamW step moves and the state it keeps per parameter, in each precision mode."""
    lines = ["| mode (Adam/AdamW) | moved per step | state kept | torch fused, same params |",
             "|:---|---:|---:|:---|"]
    for mode, p, s, master, torch_row in PRECISION_MODES:
        torch_text = (f"{optimizer_step_bytes('Adam', p, p)} B, {optimizer_state_bytes('Adam', p)} B"
                      if torch_row else "–")
        lines.append(f"| {mode} | {bytes_text(optimizer_step_bytes('Adam', p, s, master=master))} | "
                     f"{bytes_text(optimizer_state_bytes('Adam', s, master=master))} | {torch_text} |")
    return "\n".join(lines)


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
