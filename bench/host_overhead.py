"""Benchmark: the host time of an AdamW ``step()`` on real models' tensor counts, mechgpu against torch.

What it measures
----------------
The Python work of one step, in steady state, for the tensor counts of the parameter lists
of ``bench/optim.py``: ``gpt2-small`` (148 tensors), ``1b`` (183) and ``10k-x-1k`` (10,000).
The host work scales with the number of tensors, not their size, so every tensor here has
one element: the lists' counts, not their 1.01e9 parameters.

* mechgpu: ``mechgpu.optim.AdamW`` with its kernel launch stubbed out (``step_overhead.py``'s
  ``LaunchStub``): validation, the address confirmation of every param, grad and state,
  table uploads and argument assembly. Nothing else runs.
* torch: ``torch.optim.AdamW(foreach=True)``'s whole ``step()`` on the same one-element
  tensors: ``_init_group`` and the foreach dispatch, with math on one element per tensor
  (its floor; on a GPU its kernels would be queued, not waited for).

Grads are fresh tensors every step (``zero_grad()`` and a backward give that), and each step
is timed alone after untimed warm-up steps (``step_overhead.measure``). The target of the
design (issue 14) is mechgpu at most 25% of torch.

How to run
----------
    python bench/host_overhead.py               # a table
    python bench/host_overhead.py --json -      # the rows as JSON on stdout: list, tensors, mechgpu_us, torch_us
    python bench/host_overhead.py --smoke       # a few steps on the smallest list
"""

from __future__ import annotations

import argparse
import json
import sys

import step_overhead
import torch
from optim import PARAM_LISTS

CASE, REGIME, NUMEL = "AdamW", "new", 1
STEPS, WARMUP_STEPS = 30, 5
SMOKE = {"lists": ("gpt2-small",), "steps": 3, "warmup": 1}
TARGET = 0.25  # mechgpu's host time as a fraction of torch's, at most


def run(lists: tuple[str, ...], *, steps: int, warmup: int) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in lists:
        count = len(PARAM_LISTS[name]())
        times = {impl: step_overhead.measure(CASE, impl, REGIME, count, NUMEL, device, steps=steps, warmup=warmup)
                 for impl in (step_overhead.MECHGPU, "torch foreach")}
        ours, theirs = times[step_overhead.MECHGPU]["median_us"], times["torch foreach"]["median_us"]
        rows.append({"list": name, "tensors": count, "mechgpu_us": ours, "torch_us": theirs,
                     "fraction": ours / theirs, "target": TARGET})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps on the smallest list")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON ('-' for stdout, nothing else)")
    args = parser.parse_args(argv)
    lists, steps, warmup = ((SMOKE["lists"], SMOKE["steps"], SMOKE["warmup"]) if args.smoke
                            else (tuple(PARAM_LISTS), STEPS, WARMUP_STEPS))
    rows = run(lists, steps=steps, warmup=warmup)
    if args.json == "-":
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return 0
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(rows, indent=1) + "\n")
    print(f"AdamW step(), host time, median of {steps} steps with fresh grads ({torch.get_num_threads()} torch "
          f"threads); mechgpu's launch stubbed, torch foreach on one-element tensors")
    print(f"{'list':<12} {'tensors':>8} {'mechgpu µs':>11} {'torch µs':>10} {'mechgpu/torch':>14}  "
          f"target <= {TARGET:.0%}")
    for r in rows:
        print(f"{r['list']:<12} {r['tensors']:>8,} {r['mechgpu_us']:>11,.0f} {r['torch_us']:>10,.0f} "
              f"{r['fraction']:>14.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
