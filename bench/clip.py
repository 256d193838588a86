"""Benchmark: gradient clipping plus one AdamW step, fused into the step or not.

What it measures
----------------
The time of clipping the global grad norm to 1.0 and taking one AdamW step (torch's
defaults: lr 1e-3, weight decay 1e-2), on the fp32 parameter lists of ``bench/optim.py``:
``gpt2-small`` (148 tensors, 124.4M parameters) and ``1b`` (183 tensors, 1.01e9). Five
variants, each a fresh optimizer over the same params:

* (a) ``mechgpu AdamW``: the step alone, no clipping;
* (b) ``mechgpu AdamW(max_grad_norm=1.0)``: clipping fused into the step, i.e. one norm
  launch, then the step multiplies each grad by the clip coefficient in registers;
* (c) ``mechgpu.clip.clip_grad_norm_`` (a norm launch and a scaling launch), then (a);
* (d) ``torch.nn.utils.clip_grad_norm_(foreach=True)``, then ``torch.optim.AdamW(fused=True)``;
* (e) ``torch.optim.AdamW(fused=True)`` alone.

Before each variant the params and grads are redrawn from the same seed, so every variant
starts from the same values; the grads are N(0, 1), so their norm is sqrt(#params), about
1e4 for gpt2-small, far above max_norm = 1.0, and the first clip really scales them by
~1e-4. (c) and (d) clip the grads in place, so from their second call on the grads have
norm ~1.0 and the coefficient is 1 / (1 + 1e-6): still below 1, and the work is the same
(every implementation runs its scaling pass whatever the coefficient). (b) never writes
the grads, so every one of its calls sees the original norm. The JSON records the grad
norm each variant saw on its first and on its last call.

Each row reports the bytes a step must move at least, the effective GB/s, its fraction of
the device-to-device copy bandwidth measured in the same run, and per list the ratios
b/a (the cost of fused clipping; target <= 1.15 on an H100, the byte ratio is 32/28 =
1.14) and d/b (torch's clip + fused AdamW against ours; target >= 1.4), plus c/b.
Results go to ``bench/results/<device>-clip.json`` and ``.md``.

How to run
----------
    python bench/clip.py                       # both lists; needs CUDA
    python bench/clip.py --lists gpt2-small
    python bench/clip.py --smoke               # a tiny run, works on a CPU-only machine

Memory peaks at about 16 GB on the ``1b`` list: 4 GB each of params, grads and the two
AdamW states; only one optimizer lives at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import _common as common
import torch
from optim import SMOKE_LISTS, WARMUP_STEPS, Shapes, gpt2_small, llama_1b, make_params

import mechgpu.clip
import mechgpu.optim
from mechgpu.traffic import ADAM_STEP, GRAD_NORM, GRAD_SCALE

PARAM_LISTS: dict[str, Callable[[], Shapes]] = {"gpt2-small": gpt2_small, "1b": llama_1b}

MAX_NORM = 1.0

VARIANTS = {
    "a": "mechgpu AdamW",
    "b": "mechgpu AdamW(max_grad_norm)",
    "c": "mechgpu clip_grad_norm_ + mechgpu AdamW",
    "d": "torch clip_grad_norm_(foreach) + torch AdamW(fused)",
    "e": "torch AdamW(fused)",
}

# The least each variant must move per fp32 parameter, in bytes (reads + writes):
# * the AdamW step reads p, g, exp_avg, exp_avg_sq and writes p, exp_avg, exp_avg_sq:
#   7 x 4 B = 28 B (kernels/optim.py, adam_kernel);
# * a grad norm reads every grad once: 4 B (kernels/clip.py, grad_norm_kernel);
# * scaling the grads in place reads and writes every grad: 8 B (grad_scale_kernel;
#   torch's clip does the same with _foreach_mul_).
# (b) = step + norm, the step scaling g in registers: 28 + 4 = 32 B.
# (c) and (d) = step + norm + scaling pass: 28 + 4 + 8 = 40 B.
STEP_BYTES, NORM_BYTES, SCALE_BYTES = ADAM_STEP, GRAD_NORM, GRAD_SCALE  # mechgpu/traffic.py
BYTES_PER_PARAM = {
    "a": STEP_BYTES,
    "b": STEP_BYTES + NORM_BYTES,
    "c": STEP_BYTES + NORM_BYTES + SCALE_BYTES,
    "d": STEP_BYTES + NORM_BYTES + SCALE_BYTES,
    "e": STEP_BYTES,
}

# (numerator, denominator, target as (operator, bound) or None); targets are for an H100.
RATIOS = (("b", "a", ("<=", 1.15)), ("d", "b", (">=", 1.4)), ("c", "b", None))


def redraw(params: list[torch.Tensor], seed: int) -> float:
    """Fresh N(0, 1) params and grads from ``seed``; returns the grads' global 2-norm."""
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(generator=gen)
            p.grad.normal_(generator=gen)
    return grad_norm(params)


def grad_norm(params: list[torch.Tensor]) -> float:
    """The global 2-norm of the grads, computed by torch in fp64 (synchronises)."""
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in params])))


def make_step(variant: str, params: list[torch.Tensor]) -> Callable[[], object]:
    """A fresh optimizer over ``params``, as a function that clips (or not) and takes one step."""
    if variant == "a":
        return mechgpu.optim.AdamW(params).step
    if variant == "b":
        return mechgpu.optim.AdamW(params, max_grad_norm=MAX_NORM).step
    if variant == "c":
        opt = mechgpu.optim.AdamW(params)

        def step() -> None:
            mechgpu.clip.clip_grad_norm_(params, MAX_NORM)
            opt.step()

        return step
    opt = torch.optim.AdamW(params, fused=True)
    if variant == "e":
        return opt.step

    def torch_step() -> None:  # (d)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        opt.step()

    return torch_step


def time_variant(variant: str, params: list[torch.Tensor], *, quick: bool) -> dict:
    """Warm up a fresh optimizer, then time one clip + step: {"ms", "warmup_s"}."""
    start = time.perf_counter()
    step = make_step(variant, params)
    for _ in range(WARMUP_STEPS):
        step()
    common.synchronize()
    warmup_s = time.perf_counter() - start
    return {"ms": common.median_ms(step, quick=quick), "warmup_s": warmup_s}


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------
def run(lists: dict[str, Callable[[], Shapes]], *, quick: bool) -> dict:
    """Benchmark every variant on every list; returns the results as written to JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = common.run_header("clip", device, quick=quick)
    copy = header["copy"]
    results = {
        **header,
        "warmup_steps": WARMUP_STEPS,
        "max_norm": MAX_NORM,
        "variants": VARIANTS,
        "bytes_per_param": BYTES_PER_PARAM,
        "lists": {},
        "rows": [],
        "ratios": {},
    }
    torch.manual_seed(0)
    for list_name, shapes in lists.items():
        params = make_params(shapes(), device)
        numel = sum(p.numel() for p in params)
        results["lists"][list_name] = {"tensors": len(params), "params": numel}
        ms_by_variant = {}
        for variant in VARIANTS:
            first_norm = redraw(params, seed=1234)  # the same start for every variant
            timing = time_variant(variant, params, quick=quick)
            last_norm = grad_norm(params)  # (b) leaves the grads as they are; (c) and (d) rescale them
            common.free_memory()  # this optimizer's state is gone before the next one allocates
            moved = BYTES_PER_PARAM[variant] * numel
            ms = timing["ms"]
            ms_by_variant[variant] = ms
            row = {"list": list_name, "variant": variant, "implementation": VARIANTS[variant],
                   "bytes_per_param": BYTES_PER_PARAM[variant], "bytes": moved, **timing,
                   "gbps": common.gbps(moved, ms), "copy_fraction": common.gbps(moved, ms) / copy["gbps"],
                   "clips": variant in "bcd",
                   "grad_norm_first_call": first_norm if variant in "bcd" else None,
                   "grad_norm_last_call": last_norm if variant in "bcd" else None}
            results["rows"].append(row)
            print(f"{list_name} ({variant}) {VARIANTS[variant]}: {ms:.3f} ms", flush=True)
        ratios = {}
        for num, den, target in RATIOS:
            value = ms_by_variant[num] / ms_by_variant[den]
            entry = {"value": value, "target": None, "met": None}
            if target is not None:
                op, bound = target
                entry["target"] = f"{op} {bound}"
                if not quick:  # a smoke run's times say nothing about the targets
                    entry["met"] = value <= bound if op == "<=" else value >= bound
            ratios[f"{num}/{den}"] = entry
        results["ratios"][list_name] = ratios
        del params
        common.free_memory()
    return results


def to_markdown(results: dict) -> str:
    """The results as a markdown report: what was measured, a table of rows, a table of ratios."""
    head = common.report_head(results, "Gradient clipping + AdamW: fused into the step, separate, and torch",
                              f" of one clip + `opt.step()`, after {results['warmup_steps']} untimed calls", [
        "- B/param: the least each variant must read and write per fp32 parameter: the AdamW step "
        "28 B, the grad norm 4 B (reads g), a separate scaling pass 8 B (reads and writes g)",
        f"- max_norm {results['max_norm']}; grads N(0, 1), so the first call's norm is sqrt(#params) "
        "(column `grad norm`); (c) and (d) rescale the grads in place, so later calls see a norm of ~1",
        "- AdamW: torch's defaults (lr 1e-3, weight decay 1e-2); fp32 params, grads and states",
    ])
    header = ["list", "variant", "ms", "B/param", "MB moved", "GB/s", "of copy BW", "grad norm"]
    rows = []
    for r in results["rows"]:
        norm = "–" if r["grad_norm_first_call"] is None else f"{r['grad_norm_first_call']:,.4g}"
        rows.append([r["list"], f"({r['variant']}) {r['implementation']}", f"{r['ms']:.3f}",
                     str(r["bytes_per_param"]), f"{r['bytes'] / 1e6:,.4g}", f"{r['gbps']:,.1f}",
                     f"{r['copy_fraction']:.0%}", norm])
    ratio_rows = []
    for list_name, ratios in results["ratios"].items():
        for name, entry in ratios.items():
            met = "–" if entry["met"] is None else ("yes" if entry["met"] else "no")
            ratio_rows.append([list_name, name, entry["target"] or "–", met, f"{entry['value']:.3f}"])
    ratio_note = ("Ratios of ms; targets are for an H100 and are not judged on a smoke run (b/a: the cost "
                  "of clipping inside the step; d/b: torch's clip + fused AdamW against mechgpu's fused "
                  "clip + step).")
    return "\n".join(head + [common.markdown_table(header, rows, text_columns=2), "", ratio_note, "",
                             common.markdown_table(["list", "ratio", "target", "met", "value"], ratio_rows,
                                            text_columns=4)])


def main(argv: list[str] | None = None) -> None:
    parser, which = common.bench_parser(__doc__, f"tiny run on {', '.join(SMOKE_LISTS)} timed with time.perf_counter")
    which.add_argument("--lists", nargs="+", choices=list(PARAM_LISTS), help="default: all")
    args = common.parse_bench_args(parser, argv)
    lists = SMOKE_LISTS if args.smoke else {name: PARAM_LISTS[name] for name in args.lists or PARAM_LISTS}
    results = run(lists, quick=args.smoke)
    common.publish(args.out, "clip", results, to_markdown(results))


if __name__ == "__main__":
    main()
