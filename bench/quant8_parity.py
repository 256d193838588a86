"""Training parity of 8-bit optimizer states: final loss against fp32 and bf16 states.

Two tasks of ``mechgpu.testing.parity`` (its docstring describes them), each trained by mechgpu's
AdamW, RMSprop and SGD with momentum with each ``state_dtype``, and by the 8-bit twins of
bitsandbytes (``AdamW8bit``, ``RMSprop8bit``, ``SGD8bit``) and torchao (``torchao.optim.AdamW8bit``;
torchao has no 8-bit RMSprop or SGD) where they import (both run on a CPU: torchao compiles its
per-param step with torch.compile, inductor's C++ backend there); prints the final loss and its
ratio to fp32's:

- ``--task mlp`` (default): a teacher-student MLP (a noisy tanh teacher, a 32-128-64-8 student,
  two of whose three weights get 8-bit states); the final full-data MSE.
- ``--task gpt``: the tour's character GPT (2 blocks of width 64, context 32, stdlib source);
  the final mean cross-entropy per character on 8 fixed held-out batches of 16 windows.

On a CPU the kernels run in Triton's interpreter (a few minutes for the MLP at the default 400
steps; the GPT's 8-bit steps take about a second each there).

    python bench/quant8_parity.py [--task {mlp,gpt}] [--steps 400] [--seeds 3]

MLP, measured here (2-core CPU, interpreter; ``--steps 300 --seeds 2``; bitsandbytes 0.50.2 from a
separate run of the same problem, ``PYTHONPATH`` to its wheel; torchao 0.18.0 likewise, its wheel
from ``pip download torchao==0.18.0 --no-deps`` unpacked on ``PYTHONPATH``: its CUDA extensions
fail to load on this CPU machine, which its 8-bit optimizers do not need; the AdamW rows of that
run were this table's, to the digit):

optimizer  state_dtype        final loss   vs fp32
AdamW      float32              0.015436    +0.00%
AdamW      bfloat16             0.015490    +0.35%
AdamW      8bit                 0.014678    -4.91%
AdamW      bnb AdamW8bit        0.014954    -3.12%
AdamW      torchao AdamW8bit    0.014958    -3.09%
RMSprop    float32              0.019864    +0.00%
RMSprop    bfloat16             0.019899    +0.18%
RMSprop    8bit                 0.019327    -2.71%
RMSprop    bnb RMSprop8bit      0.019356    -2.56%
SGD        float32              0.029681    +0.00%
SGD        bfloat16             0.029682    +0.00%
SGD        8bit                 0.029710    +0.10%
SGD        bnb SGD8bit          0.029692    +0.04%

GPT, measured here (2-core CPU shared with a CI run, interpreter, about 13 minutes; bitsandbytes
not installed), ``python bench/quant8_parity.py --task gpt --steps 100 --seeds 1``; the held-out
loss before training is 5.52 (ln 94 = 4.54 for a uniform guess):

optimizer     state_dtype   final loss (mean of seeds)  vs fp32
AdamW             float32                     2.385887   +0.00%
AdamW            bfloat16                     2.384793   -0.05%
AdamW                8bit                     2.387877   +0.08%
RMSprop           float32                     2.399954   +0.00%
RMSprop          bfloat16                     2.400113   +0.01%
RMSprop              8bit                     2.398252   -0.07%
SGD               float32                     2.882509   +0.00%
SGD              bfloat16                     2.869527   -0.45%
SGD                  8bit                     2.880952   -0.05%
"""

from __future__ import annotations

import argparse
import statistics

import _common  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import torch

from mechgpu.testing.parity import PARITY, parity_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--task", choices=sorted(PARITY), default="mlp",
                        help="mlp: the teacher-student MLP (final full-data MSE); gpt: the tour's character "
                             "GPT (final held-out cross-entropy per character)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{'optimizer':10s} {'state_dtype':>14s} {'final loss (mean of seeds)':>28s} {'vs fp32':>8s}")
    for optimizer, options in PARITY[args.task].items():
        losses = {}
        for state_dtype in (torch.float32, torch.bfloat16, "8bit"):
            runs = [parity_loss(optimizer, {**options, "state_dtype": state_dtype}, args.steps, seed, device,
                                 args.task)
                    for seed in range(args.seeds)]
            losses[state_dtype] = statistics.mean(runs)
            ratio = losses[state_dtype] / losses[torch.float32] - 1
            print(f"{optimizer:10s} {str(state_dtype).replace('torch.', ''):>14s} {losses[state_dtype]:28.6f} "
                  f"{100 * ratio:+7.2f}%", flush=True)
        for label, twin in (("bnb", _bitsandbytes_twin(optimizer)), ("torchao", _torchao_twin(optimizer))):
            if twin is None:
                continue
            runs = [parity_loss(twin, options, args.steps, seed, device, args.task) for seed in range(args.seeds)]
            loss = statistics.mean(runs)
            print(f"{optimizer:10s} {label + ' ' + twin.__name__:>14s} {loss:28.6f} "
                  f"{100 * (loss / losses[torch.float32] - 1):+7.2f}%", flush=True)


def _bitsandbytes_twin(optimizer: str):
    """bitsandbytes' 8-bit optimizer of the same rule (block-wise dynamic map, 256 per block), where it imports."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return getattr(bnb.optim, f"{optimizer}8bit", None)


def _torchao_twin(optimizer: str):
    """torchao's 8-bit optimizer of the same rule (``torchao.optim``: block-wise dynamic map, 256 per block,
    8-bit only for tensors of >= 4,096 elements that 256 divides), where it imports: AdamW only."""
    try:
        import torchao.optim
    except ImportError:
        return None
    return getattr(torchao.optim, f"{optimizer}8bit", None)


if __name__ == "__main__":
    main()
