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
* (e) ``torch.optim.AdamW(fused=True)`` alone;
* (f) (b) with ``state_dtype=torch.bfloat16``: bf16 exp_avg and exp_avg_sq;
* (g) (b) with ``state_dtype="8bit"``: block-wise 8-bit states (``mechgpu.optim.quant8``), dequantized
  and requantized in the step's registers; tensors under ``MIN_8BIT_NUMEL`` elements keep fp32 states.

(a)-(e) keep fp32 states; (f) and (g) are the state precisions against (d), torch's clip + fused
AdamW, which has no smaller states.

Before each variant the params and grads are redrawn from the same seed, so every variant
starts from the same values; the grads are N(0, 1), so their norm is sqrt(#params), about
1e4 for gpt2-small, far above max_norm = 1.0, and the first clip really scales them by
~1e-4. (c) and (d) clip the grads in place, so from their second call on the grads have
norm ~1.0 and the coefficient is 1 / (1 + 1e-6): still below 1, and the work is the same
(every implementation runs its scaling pass whatever the coefficient). (b) never writes
the grads, so every one of its calls sees the original norm. The JSON records the grad
norm each variant saw on its first and on its last call.

Each row reports the bytes a step must move at least (``mechgpu.traffic``, summed over the
list's tensors: an 8-bit state's bytes depend on its tensor's size), the effective GB/s, its
fraction of the device-to-device copy bandwidth measured in the same run, and per list the
ratios b/a (the cost of fused clipping; target <= 1.15 on an H100, the byte ratio is 32/28 =
1.14) and d/b (torch's clip + fused AdamW against ours; target >= 1.4), plus c/b, d/f and d/g
(torch against ours with bf16 and 8-bit states; no target yet: the byte ratios are 40/24 and
40/20.1).
Results go to ``bench/results/<device>-clip.json`` and ``.md``.

How to run
----------
    python bench/clip.py                       # both lists; needs CUDA
    python bench/clip.py --lists gpt2-small
    python bench/clip.py --smoke               # a tiny run, works on a CPU-only machine

The smoke list has one tensor of at least ``MIN_8BIT_NUMEL`` elements, with a partial last block,
so that (g) runs the 8-bit kernel and its byte count the partial block.

Memory peaks at about 16 GB on the ``1b`` list: 4 GB each of params, grads and the two
AdamW states; only one optimizer lives at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import _common as common
import torch
from optim import WARMUP_STEPS, Shapes, gpt2_small, llama_1b, make_params

import mechgpu.clip
import mechgpu.optim
from mechgpu import traffic
from mechgpu.optim.quant8 import MIN_8BIT_NUMEL, QUANT_BLOCK, STATE_8BIT

PARAM_LISTS: dict[str, Callable[[], Shapes]] = {"gpt2-small": gpt2_small, "1b": llama_1b}
#: the smoke run's list: a tensor of 41 x 127 = 5,207 elements (8-bit states, a partial last block)
#: between two of 1,000 (fp32 states under "8bit")
SMOKE_LISTS: dict[str, Callable[[], Shapes]] = {"1k-5k-1k": lambda: [(1000,), (41, 127), (1000,)]}

MAX_NORM = 1.0

VARIANTS = {
    "a": "mechgpu AdamW",
    "b": "mechgpu AdamW(max_grad_norm)",
    "c": "mechgpu clip_grad_norm_ + mechgpu AdamW",
    "d": "torch clip_grad_norm_(foreach) + torch AdamW(fused)",
    "e": "torch AdamW(fused)",
    "f": "mechgpu AdamW(max_grad_norm), bf16 states",
    "g": "mechgpu AdamW(max_grad_norm), 8-bit states",
}
#: each variant's state_dtype, and its name in the JSON and the tables (the others keep fp32 states)
STATE_DTYPES = {"f": torch.bfloat16, "g": STATE_8BIT}
STATE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", STATE_8BIT: "8-bit"}
#: the variants that clip: in the step (b, f, g) or with a separate scaling pass (c, d)
CLIPS_IN_STEP, CLIPS_APART = "bfg", "cd"

# The least each variant must move, from mechgpu.traffic, per parameter element with fp32 params:
# * the AdamW step reads p, g and the two states and writes p and the states:
#   3 x 4 B + 2 x 2 x S (S: a state's bytes per element; 28 B with fp32 states, kernels/optim.py);
# * a grad norm reads every grad once: 4 B (kernels/clip.py, grad_norm_kernel);
# * scaling the grads in place reads and writes every grad: 8 B (grad_scale_kernel;
#   torch's clip does the same with _foreach_mul_).
# (b), (f), (g) = step + norm, the step scaling g in registers; (c) and (d) = step + norm + scaling pass.
def state_size(variant: str, numel: int) -> float:
    """Bytes per element of one AdamW state of a ``numel``-element tensor in ``variant``."""
    dtype = STATE_DTYPES.get(variant, torch.float32)
    if dtype == STATE_8BIT:
        return traffic.state_8bit_size(numel)
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_element(variant: str, numel: int) -> float:
    """The least ``variant`` reads and writes per element of a ``numel``-element fp32 param."""
    clip = traffic.GRAD_NORM if variant in CLIPS_IN_STEP + CLIPS_APART else 0
    scale = traffic.GRAD_SCALE if variant in CLIPS_APART else 0
    return traffic.optimizer_step_bytes("AdamW", traffic.FP32, state_size(variant, numel)) + clip + scale


def step_bytes(variant: str, numels: list[int]) -> float:
    """The least one step of ``variant`` moves over tensors of ``numels`` elements."""
    return sum(n * bytes_per_element(variant, n) for n in numels)


# (numerator, denominator, target as (operator, bound) or None); targets are for an H100.
RATIOS = (("b", "a", ("<=", 1.15)), ("d", "b", (">=", 1.4)), ("c", "b", None), ("d", "f", None), ("d", "g", None))


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
    if variant in CLIPS_IN_STEP:
        return mechgpu.optim.AdamW(params, max_grad_norm=MAX_NORM,
                                   state_dtype=STATE_DTYPES.get(variant, torch.float32)).step
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
        "state_dtypes": {v: STATE_NAMES[STATE_DTYPES.get(v, torch.float32)] for v in VARIANTS},
        "lists": {},
        "rows": [],
        "ratios": {},
    }
    torch.manual_seed(0)
    for list_name, shapes in lists.items():
        params = make_params(shapes(), device)
        numels = [p.numel() for p in params]
        numel = sum(numels)
        results["lists"][list_name] = {"tensors": len(params), "params": numel}
        ms_by_variant = {}
        for variant in VARIANTS:
            first_norm = redraw(params, seed=1234)  # the same start for every variant
            timing = time_variant(variant, params, quick=quick)
            last_norm = grad_norm(params)  # (b) leaves the grads as they are; (c) and (d) rescale them
            common.free_memory()  # this optimizer's state is gone before the next one allocates
            moved = step_bytes(variant, numels)
            ms = timing["ms"]
            ms_by_variant[variant] = ms
            clips = variant in CLIPS_IN_STEP + CLIPS_APART
            row = {"list": list_name, "variant": variant, "implementation": VARIANTS[variant],
                   "state_dtype": STATE_NAMES[STATE_DTYPES.get(variant, torch.float32)],
                   "bytes_per_param": moved / numel, "bytes": moved, **timing,
                   "gbps": common.gbps(moved, ms), "copy_fraction": common.gbps(moved, ms) / copy["gbps"],
                   "clips": clips,
                   "grad_norm_first_call": first_norm if clips else None,
                   "grad_norm_last_call": last_norm if clips else None}
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
    def adam(state_size: float) -> float:
        return traffic.optimizer_step_bytes("AdamW", traffic.FP32, state_size)

    head = common.report_head(results, "Gradient clipping + AdamW: fused into the step, separate, and torch",
                              f" of one clip + `opt.step()`, after {results['warmup_steps']} untimed calls", [
        "- B/param: the least each variant must read and write per fp32 parameter (`mechgpu.traffic`, averaged "
        f"over the list's tensors): the AdamW step {adam(traffic.FP32):g} B with fp32 states, {adam(traffic.BF16):g} B "
        f"with bf16 states, {adam(traffic.STATE_8BIT):g} B with 8-bit states (a code per element and an fp32 absmax "
        f"per {QUANT_BLOCK}; tensors under {MIN_8BIT_NUMEL:,} elements keep fp32 states), the grad norm "
        f"{traffic.GRAD_NORM} B (reads g), a separate scaling pass {traffic.GRAD_SCALE} B (reads and writes g)",
        f"- max_norm {results['max_norm']}; grads N(0, 1), so the first call's norm is sqrt(#params) "
        "(column `grad norm`); (c) and (d) rescale the grads in place, so later calls see a norm of ~1",
        "- AdamW: torch's defaults (lr 1e-3, weight decay 1e-2); fp32 params and grads; states fp32 except "
        "in (f) and (g)",
    ])
    header = ["list", "variant", "states", "ms", "B/param", "MB moved", "GB/s", "of copy BW", "grad norm"]
    rows = []
    for r in results["rows"]:
        norm = "–" if r["grad_norm_first_call"] is None else f"{r['grad_norm_first_call']:,.4g}"
        rows.append([r["list"], f"({r['variant']}) {r['implementation']}", r["state_dtype"], f"{r['ms']:.3f}",
                     f"{r['bytes_per_param']:.4g}", f"{r['bytes'] / 1e6:,.4g}", f"{r['gbps']:,.1f}",
                     f"{r['copy_fraction']:.0%}", norm])
    ratio_rows = []
    for list_name, ratios in results["ratios"].items():
        for name, entry in ratios.items():
            met = "–" if entry["met"] is None else ("yes" if entry["met"] else "no")
            ratio_rows.append([list_name, name, entry["target"] or "–", met, f"{entry['value']:.3f}"])
    ratio_note = ("Ratios of ms; targets are for an H100 and are not judged on a smoke run (b/a: the cost "
                  "of clipping inside the step; d/b: torch's clip + fused AdamW against mechgpu's fused "
                  "clip + step; d/f, d/g: the same with bf16 and 8-bit states).")
    return "\n".join(head + [common.markdown_table(header, rows, text_columns=3), "", ratio_note, "",
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
