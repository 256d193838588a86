"""Benchmark: one AdamW step in each of mechgpu's mixed-precision modes.

What it measures
----------------
The time of one full ``opt.step()`` of AdamW (torch's defaults: lr 1e-3, weight decay
1e-2) on GPT-2 small's tensors (the ``gpt2-small`` list of ``bench/optim.py``: 148 tensors,
124.4M parameters; ``--lists 1b`` takes its 1B list instead), in each mode mechgpu offers
(``--modes`` picks some), against ``torch.optim.AdamW(fused=True)`` on fp32 params:

=============================  ======  ===============  =====================
mode                           params  states           mechgpu options
=============================  ======  ===============  =====================
torch fused fp32 (reference)   fp32    fp32             (torch, fused=True)
fp32                           fp32    fp32
bf16                           bf16    fp32
bf16, bf16 states              bf16    bf16             state_dtype=bf16
bf16, master weights           bf16    fp32 + master    master_weights=True
bf16, stochastic rounding      bf16    fp32             stochastic_rounding
fp16, master, GradScaler       fp16    fp32 + master    master_weights=True
=============================  ======  ===============  =====================

B/param, the least a step moves per parameter, and "state B" come from ``mechgpu.traffic``
(``optimizer_step_bytes``, ``optimizer_state_bytes``), whose docstrings derive them and
whose numbers tests/test_traffic.py checks against what the kernel loads and stores.
Stochastic rounding draws its random bits in registers: same bytes as plain bf16.
GradScaler's ``grad_scale`` and ``found_inf`` are two scalars read once per program.

"state B" is the optimizer state kept between steps, per parameter. The JSON has it both as
derived and as measured from ``opt.state`` after the run (it includes the per-tensor
step counters, a few bytes per tensor).

The GradScaler mode sets ``opt.grad_scale`` (65536, GradScaler's initial scale) and
``opt.found_inf`` (0) by hand, as ``torch.amp.GradScaler.step`` does for an optimizer with
``_step_supports_amp_scaling``, on grads of N(0, 1e-3) scaled by 65536 and stored in fp16:
the step unscales the grads in registers. The rest of a real GradScaler iteration (its
inf check over the grads, 2 B/param in fp16, and ``update()``) is not timed here.

Every mode checks after its untimed steps that each of them was taken (step counters)
and that the params are finite. Rows report ms, B/param, effective GB/s, the fraction of
the device-to-device copy bandwidth measured in the same run, and torch fused fp32's ms
divided by the mode's ms. Results go to ``bench/results/<device>-mixed_precision.json``
and ``.md``. The copy is of a buffer as large as the list's fp32 params, at least 1 GiB, so that
it streams through DRAM as the step does (bench/device_session.py compares the DRAM throughput of
the fp32 and bf16 + master steps at 1B this way, without ncu).

How to run
----------
    python bench/mixed_precision.py            # needs CUDA
    python bench/mixed_precision.py --lists 1b --modes fp32 "bf16, master weights"
    python bench/mixed_precision.py --smoke    # a tiny run, works on a CPU-only machine
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import _common as common
import torch
from optim import SMOKE_LISTS, WARMUP_STEPS, Shapes, gpt2_small, llama_1b

import mechgpu.optim
from mechgpu import traffic

PARAM_LISTS: dict[str, Callable[[], Shapes]] = {"gpt2-small": gpt2_small, "1b": llama_1b}

# GradScaler's default initial scale, and the spread of the unscaled grads in that mode
# (so that scaled grads, ~65 here, fit fp16 comfortably).
GRAD_SCALE = 65536.0
UNSCALED_GRAD_STD = 1e-3


@dataclass(frozen=True)
class Mode:
    name: str
    implementation: str  # "mechgpu" or "torch fused"
    param_dtype: torch.dtype
    options: dict = field(default_factory=dict)  # mechgpu AdamW keyword options
    grad_scaler: bool = False  # set opt.grad_scale / opt.found_inf as GradScaler does

    @property
    def master(self) -> bool:
        return bool(self.options.get("master_weights")) and self.param_dtype != torch.float32

    @property
    def state_dtype(self) -> torch.dtype:
        return self.options.get("state_dtype", torch.float32 if self.implementation == "mechgpu"
                                else self.param_dtype)  # torch keeps states in the param's dtype

    def bytes_per_param(self) -> int:
        """The least one step moves per parameter (``mechgpu.traffic.optimizer_step_bytes``)."""
        return traffic.optimizer_step_bytes("AdamW", _size(self.param_dtype), _size(self.state_dtype),
                                            master=self.master)

    def state_bytes_per_param(self) -> int:
        """exp_avg + exp_avg_sq, plus the fp32 master copy when there is one."""
        return traffic.optimizer_state_bytes("AdamW", _size(self.state_dtype), master=self.master)

    def describe(self) -> str:
        parts = [f"{k}={_dtype_name(v) if isinstance(v, torch.dtype) else v}"
                 for k, v in self.options.items()]
        if self.grad_scaler:
            parts.append(f"grad_scale={GRAD_SCALE:g}, found_inf=0")
        if self.implementation == "torch fused":
            parts.append("fused=True")
        return ", ".join(parts) or "–"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


MODES = (
    Mode("torch fused fp32", "torch fused", torch.float32),
    Mode("fp32", "mechgpu", torch.float32),
    Mode("bf16", "mechgpu", torch.bfloat16),
    Mode("bf16, bf16 states", "mechgpu", torch.bfloat16, {"state_dtype": torch.bfloat16}),
    Mode("bf16, master weights", "mechgpu", torch.bfloat16, {"master_weights": True}),
    Mode("bf16, stochastic rounding", "mechgpu", torch.bfloat16, {"stochastic_rounding": True}),
    Mode("fp16, master, GradScaler", "mechgpu", torch.float16, {"master_weights": True}, grad_scaler=True),
)
REFERENCE = MODES[0].name


def make_params(shapes: Shapes, device: torch.device, mode: Mode) -> list[torch.Tensor]:
    """Leaf tensors of the mode's dtype, each with a grad (pre-scaled for the GradScaler mode)."""
    torch.manual_seed(0)  # the same values in every mode, up to rounding
    params = []
    for shape in shapes:
        p = torch.randn(shape, device=device).to(mode.param_dtype).requires_grad_()
        g = torch.randn(shape, device=device)
        if mode.grad_scaler:
            g = g * (UNSCALED_GRAD_STD * GRAD_SCALE)
        p.grad = g.to(mode.param_dtype)
        params.append(p)
    return params


def make_optimizer(mode: Mode, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if mode.implementation == "torch fused":
        return torch.optim.AdamW(params, fused=True)
    opt = mechgpu.optim.AdamW(params, **mode.options)
    if mode.grad_scaler:
        # What torch.amp.GradScaler.step sets on an optimizer with _step_supports_amp_scaling
        # (fp32 0-d tensors on the params' device) before calling its step().
        device = params[0].device
        opt.grad_scale = torch.full((), GRAD_SCALE, dtype=torch.float32, device=device)
        opt.found_inf = torch.zeros((), dtype=torch.float32, device=device)
    return opt


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (states, masters, step counters)."""
    return sum(t.numel() * t.element_size() for state in opt.state.values()
               for t in state.values() if torch.is_tensor(t))


def check_steps_taken(mode: Mode, opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int) -> None:
    """Every untimed step was taken (not skipped, e.g. by a found_inf), and the params are finite."""
    counted = {float(opt.state[p]["step"]) for p in params}
    if counted != {float(steps)}:
        raise RuntimeError(f"{mode.name}: after {steps} steps the step counters read {sorted(counted)}")
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise RuntimeError(f"{mode.name}: non-finite params after {steps} steps")


def time_mode(mode: Mode, params: list[torch.Tensor], *, quick: bool) -> dict:
    """Warm up a fresh optimizer, check it, then time one step: {"ms", "warmup_s", "state_bytes"}."""
    start = time.perf_counter()
    opt = make_optimizer(mode, params)
    for _ in range(WARMUP_STEPS):
        opt.step()
    common.synchronize()
    warmup_s = time.perf_counter() - start
    check_steps_taken(mode, opt, params, WARMUP_STEPS)
    return {"ms": common.median_ms(opt.step, quick=quick), "warmup_s": warmup_s, "state_bytes": state_bytes(opt)}


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------
def run(list_name: str, shapes: Callable[[], Shapes], modes: tuple[Mode, ...] = MODES, *, quick: bool) -> dict:
    """Benchmark ``modes`` on one list; returns the results as written to JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape_list = shapes()
    numel = sum(torch.Size(s).numel() for s in shape_list)
    header = common.run_header("mixed_precision", device, quick=quick, copy_bytes=max(1 << 30, 4 * numel))
    copy = header["copy"]
    results = {
        **header,
        "warmup_steps": WARMUP_STEPS,
        "optimizer": "AdamW, torch's defaults",
        "bytes_model": "mechgpu.traffic.optimizer_step_bytes",
        "grad_scale": GRAD_SCALE,
        "list": {"name": list_name, "tensors": len(shape_list), "params": numel},
        "rows": [],
    }
    reference_ms = None  # torch fused fp32's, when it is among the modes (it runs first)
    for mode in modes:
        params = make_params(shape_list, device, mode)
        timing = time_mode(mode, params, quick=quick)
        del params
        common.free_memory()  # this mode's params and state are gone before the next one allocates
        ms = timing["ms"]
        if mode.name == REFERENCE:
            reference_ms = ms
        measured = timing["state_bytes"] / numel
        if abs(measured - mode.state_bytes_per_param()) > 0.05:  # step counters add a few B per tensor
            raise RuntimeError(f"{mode.name}: the optimizer state holds {measured:.3f} B/param, "
                               f"not the {mode.state_bytes_per_param()} B/param derived for this mode")
        moved = mode.bytes_per_param() * numel
        row = {
            "mode": mode.name, "implementation": mode.implementation,
            "param_dtype": _dtype_name(mode.param_dtype), "state_dtype": _dtype_name(mode.state_dtype),
            "master_weights": mode.master, "options": mode.describe(),
            "bytes_per_param": mode.bytes_per_param(), "bytes": moved,
            "state_bytes_per_param": mode.state_bytes_per_param(),
            "measured_state_bytes_per_param": measured,
            "param_plus_state_bytes_per_param": _size(mode.param_dtype) + mode.state_bytes_per_param(),
            "ms": ms, "warmup_s": timing["warmup_s"],
            "gbps": common.gbps(moved, ms), "copy_fraction": common.gbps(moved, ms) / copy["gbps"],
            "speedup_vs_torch_fused_fp32": reference_ms / ms if reference_ms else None,
        }
        results["rows"].append(row)
        print(f"{list_name} {mode.name}: {ms:.3f} ms", flush=True)
    return results


def to_markdown(results: dict) -> str:
    """The results as a markdown report: what was measured, then one table row per mode."""
    info = results["list"]
    head = common.report_head(results, "mechgpu AdamW in each mixed-precision mode vs torch fused AdamW (fp32)",
                              f" of one full `opt.step()`, after {results['warmup_steps']} untimed steps", [
        f"- B/param: the least a step reads and writes per parameter (`{results['bytes_model']}`)",
        "- state B/param: optimizer state kept between steps (exp_avg, exp_avg_sq, fp32 master); "
        "param + state adds the param itself",
        f"- GradScaler: `opt.grad_scale` = {results['grad_scale']:g} and `opt.found_inf` = 0 set by hand, "
        "as GradScaler.step sets them; its inf check and update() are not timed",
        f"- {results['optimizer']}; list: {info['name']}, {info['tensors']:,} tensors, "
        f"{info['params']:,} params",
        "- vs torch: torch fused fp32's ms / the mode's ms",
    ])
    header = ["mode", "options", "ms", "B/param", "GB/s", "of copy BW", "state B/param",
              "param + state B/param", "vs torch"]
    rows = [[r["mode"], r["options"], f"{r['ms']:.3f}", str(r["bytes_per_param"]), f"{r['gbps']:,.1f}",
             f"{r['copy_fraction']:.0%}", str(r["state_bytes_per_param"]),
             str(r["param_plus_state_bytes_per_param"]), _times(r["speedup_vs_torch_fused_fp32"])]
            for r in results["rows"]]
    return "\n".join(head + [common.markdown_table(header, rows, text_columns=2)])


def _times(speedup: float | None) -> str:
    return "–" if speedup is None else f"{speedup:.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser, which = common.bench_parser(__doc__, f"tiny run on {', '.join(SMOKE_LISTS)} timed with time.perf_counter")
    which.add_argument("--lists", choices=list(PARAM_LISTS), default="gpt2-small", help="default: gpt2-small")
    parser.add_argument("--modes", nargs="+", choices=[m.name for m in MODES], default=[m.name for m in MODES],
                        help="default: all, in this order")
    args = common.parse_bench_args(parser, argv)
    (list_name, shapes), = (SMOKE_LISTS if args.smoke else {args.lists: PARAM_LISTS[args.lists]}).items()
    results = run(list_name, shapes, tuple(m for m in MODES if m.name in args.modes), quick=args.smoke)
    common.publish(args.out, "mixed_precision", results, to_markdown(results))


if __name__ == "__main__":
    main()
