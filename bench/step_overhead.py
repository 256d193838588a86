"""Benchmark: the host time of ``optimizer.step()``, with mechgpu's kernel launches stubbed out.

What it measures
----------------
The Python work of one mechgpu optimizer step, alone: validation, address checks, table
uploads and argument assembly. Triton's launch is replaced by a no-op that counts its
calls (``InterpretedFunction.run`` under ``TRITON_INTERPRET=1``, ``JITFunction.run`` on
CUDA: the call behind ``kernel[grid](...)`` in both), so no kernel runs, no kernel is
compiled, and the optimizer states never change; triton's own per-launch work (binding
and specialising the arguments) is left out too. Each step's launch count is reported: 2
for Adam and SGD (the step prologue, then the update), 3 for AdamW with ``max_grad_norm``
(the norm first).

torch.optim's own ``step()`` (``foreach=True``, and ``fused=True`` where torch has it on
the device) runs in full as a reference: its time includes its math, so its tensors are
small (64 elements) and it runs again with 1-element tensors to show its floor. On the
CPU that math runs inside the timed region; on a GPU the time is the host's only (no
synchronisation inside it), as for mechgpu.

Cases, on fp32 params of 64 elements, 150 and 10,000 tensors in one param group:

* ``Adam``, ``AdamW``: torch's defaults;
* ``AdamW + clip``: ``max_grad_norm=1.0`` for mechgpu (a norm launch, then the step's two);
  ``torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)`` then the step for torch,
  both inside the timed region;
* ``SGD momentum``: momentum 0.9.

Each case runs in two grad regimes: ``same``, the same grad tensors every step (what
``zero_grad(set_to_none=False)`` gives), and ``new``, a fresh grad tensor per param every
step (what ``zero_grad(set_to_none=True)`` and a backward give). The fresh grads are made
while the previous ones still exist, so every grad address changes every step.

Every step is timed on its own with ``time.perf_counter`` around ``step()`` alone (grads
are made and the device synchronised before the clock starts; as in ``timeit``, Python's
cyclic garbage collector is off while a row's steps run), after a few untimed steps
that create the states and caches. The table gives the median and p90 microseconds per
step, the median per tensor, and the median of the timing thread's CPU time
(``time.thread_time``), which a busy machine inflates less than the wall clock.
``--label`` names the run (say ``before`` and ``after`` a change); results go to
``bench/results/step-overhead-<device>[-<label>].json`` and ``.md``.

How to run
----------
    python bench/step_overhead.py                                   # everything, on CUDA or the CPU
    python bench/step_overhead.py --out bench/results --label after
    python bench/step_overhead.py --tensors 150 --cases Adam --steps 200
    python bench/step_overhead.py --smoke                           # a few steps on 3 tensors

The CPU numbers are real host times (the stub makes the interpreter irrelevant), but a
CPU step uploads its tables with a memcpy where a GPU step does a host-to-device copy.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import _common as common
import torch

import mechgpu.optim

BENCHMARK = "step-overhead"
TENSOR_COUNTS = (150, 10_000)
NUMEL = 64  # elements per tensor: small, so torch's math is small
FLOOR_NUMEL = 1  # torch once more on 1-element tensors: its floor
STEPS, WARMUP_STEPS = 50, 5
SMOKE = {"tensors": (3,), "steps": 3, "warmup": 1}

# name: (optimizer class, its keyword arguments, max_grad_norm)
CASES: dict[str, tuple[str, dict, float | None]] = {
    "Adam": ("Adam", {}, None),
    "AdamW": ("AdamW", {}, None),
    "AdamW + clip": ("AdamW", {}, 1.0),
    "SGD momentum": ("SGD", {"momentum": 0.9}, None),
}
REGIMES = ("same", "new")
MECHGPU = "mechgpu, launch stubbed"
TORCH_IMPLEMENTATIONS = ("torch foreach", "torch fused")


# ----------------------------------------------------------------------------------
# The stub
# ----------------------------------------------------------------------------------
class LaunchStub:
    """Within ``with stub:``, every triton launch is a no-op that only adds 1 to ``calls``.

    ``kernel[grid](*args)`` calls ``kernel.run(*args, grid=grid, warmup=False)``: the
    compile-and-launch of ``JITFunction`` on CUDA, the interpreter's ``GridExecutor`` under
    TRITON_INTERPRET=1. Replacing ``run`` on the class leaves only the caller's own work.
    """

    def __init__(self) -> None:
        if torch.cuda.is_available():
            from triton.runtime.jit import JITFunction as kernel_class
        else:
            from triton.runtime.interpreter import InterpretedFunction as kernel_class
        self.kernel_class = kernel_class
        self.patched = f"{kernel_class.__module__}.{kernel_class.__qualname__}.run"
        self.calls = 0
        self._saved = None

    def __enter__(self) -> LaunchStub:
        def run(kernel, *args, **kwargs) -> None:
            self.calls += 1

        self._saved = self.kernel_class.run
        self.kernel_class.run = run
        return self

    def __exit__(self, *exc) -> None:
        self.kernel_class.run = self._saved


# ----------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------
def make_params(count: int, numel: int, device: torch.device) -> list[torch.Tensor]:
    """``count`` fp32 leaf tensors of ``numel`` elements, each with a random grad."""
    params = []
    for _ in range(count):
        p = torch.randn(numel, device=device).requires_grad_()
        p.grad = torch.randn_like(p)
        params.append(p)
    return params


def new_grads(params: list[torch.Tensor]) -> None:
    """A fresh grad tensor for every param, made while the old ones still exist."""
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g


def make_step(case: str, implementation: str, params: list[torch.Tensor]) -> Callable[[], object]:
    """A fresh optimizer over ``params``, as a function that takes one step."""
    name, kwargs, max_grad_norm = CASES[case]
    if implementation == MECHGPU:
        if max_grad_norm is not None:
            kwargs = {**kwargs, "max_grad_norm": max_grad_norm}
        return getattr(mechgpu.optim, name)(params, **kwargs).step
    flag = {"torch foreach": "foreach", "torch fused": "fused"}[implementation]
    opt = getattr(torch.optim, name)(params, **{flag: True}, **kwargs)
    if max_grad_norm is None:
        return opt.step

    def clip_and_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
        opt.step()

    return clip_and_step


def time_steps(step: Callable[[], object], params: list[torch.Tensor], regime: str, *, steps: int,
               warmup: int, stub: LaunchStub | None) -> tuple[list[float], list[float], list[int]]:
    """Microseconds of each of ``steps`` steps after ``warmup`` untimed ones (wall clock, and
    this thread's CPU time), and the launches each made (with a stub)."""
    times, cpu_times, launches = [], [], []
    gc.collect()
    gc.disable()  # as timeit does: no collector pause lands in a timed step
    try:
        for i in range(warmup + steps):
            if regime == "new":
                new_grads(params)
            common.synchronize()
            calls = stub.calls if stub is not None else 0
            start, cpu_start = time.perf_counter(), time.thread_time()
            step()
            elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
            if i >= warmup:
                times.append(1e6 * elapsed)
                cpu_times.append(1e6 * cpu)
                if stub is not None:
                    launches.append(stub.calls - calls)
    finally:
        gc.enable()
    return times, cpu_times, launches


def p90(values: list[float]) -> float:
    """The 90th percentile (statistics.quantiles, inclusive method)."""
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def measure(case: str, implementation: str, regime: str, count: int, numel: int, device: torch.device, *,
            steps: int, warmup: int) -> dict:
    """One row: a fresh optimizer over fresh params, timed; torch's errors are recorded."""
    torch.manual_seed(0)
    params = make_params(count, numel, device)
    row = {"case": case, "regime": regime, "implementation": implementation, "tensors": count, "numel": numel,
           "launches_per_step": None, "median_us": None, "p90_us": None, "us_per_tensor": None,
           "cpu_median_us": None, "error": None}
    try:
        step = make_step(case, implementation, params)
        if implementation == MECHGPU:
            with LaunchStub() as stub:
                times, cpu_times, launches = time_steps(step, params, regime, steps=steps, warmup=warmup,
                                                        stub=stub)
            if min(launches) == 0:
                raise RuntimeError(f"a {case} step made no launch through {stub.patched}: the stub missed "
                                   "mechgpu's launches (or the step fell back to torch), so the time is not "
                                   "the host overhead this benchmark means to measure")
            row["launches_per_step"] = sorted(set(launches))
        else:
            times, cpu_times, _ = time_steps(step, params, regime, steps=steps, warmup=warmup, stub=None)
    except Exception as exc:
        if implementation == MECHGPU:
            raise
        message = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {message[0] if message else ''}"
        return row
    median = statistics.median(times)
    row.update(median_us=median, p90_us=p90(times), us_per_tensor=median / count,
               cpu_median_us=statistics.median(cpu_times))
    return row


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------
def source_of_mechgpu() -> dict:
    """Which mechgpu.optim was imported (a before/after pair compares two trees)."""
    folder = Path(mechgpu.optim.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"path": str(folder), "sha1": digest.hexdigest()[:12]}


def run(cases: list[str], counts: tuple[int, ...], *, steps: int, warmup: int, label: str | None,
        smoke: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {
        **common.environment(device),
        "benchmark": BENCHMARK,
        "label": label,
        "smoke": smoke,
        "mechgpu_optim": source_of_mechgpu(),
        "stubbed": LaunchStub().patched,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": {"start": os.getloadavg()[0], "end": None},
        "timing": {"method": "time.perf_counter around each step()", "steps": steps, "warmup_steps": warmup},
        "numel": NUMEL,
        "floor_numel": FLOOR_NUMEL,
        "cases": {name: {"optimizer": opt, "kwargs": kwargs, "max_grad_norm": clip}
                  for name, (opt, kwargs, clip) in CASES.items() if name in cases},
        "rows": [],
    }
    for count in counts:
        for case in cases:
            for regime in REGIMES:
                runs = [(MECHGPU, NUMEL)] + [(impl, n) for impl in TORCH_IMPLEMENTATIONS for n in (NUMEL, FLOOR_NUMEL)]
                for implementation, numel in runs:
                    row = measure(case, implementation, regime, count, numel, device, steps=steps, warmup=warmup)
                    common.free_memory()  # this optimizer and its params are gone before the next
                    results["rows"].append(row)
                    outcome = row["error"] or f"median {row['median_us']:,.1f} us, p90 {row['p90_us']:,.1f} us"
                    print(f"{count} x {numel} {case}, {regime} grads, {implementation}: {outcome}", flush=True)
    results["load_average"]["end"] = os.getloadavg()[0]
    return results


def to_markdown(results: dict) -> str:
    """The results as a markdown report: what was measured, then one row per measurement."""
    timing = results["timing"]
    label = f" ({results['label']})" if results["label"] else ""
    source = results["mechgpu_optim"]
    load, os_cpus = results["load_average"], results["cpus"]
    smoke = ["", "Smoke run: a few steps on a few tensors; not a measurement."] if results["smoke"] else []
    head = [
        f"# Host time of optimizer.step(): mechgpu with its launches stubbed out, and torch.optim{label}",
        "",
        f"{results['device']} · torch {results['torch']} · triton {results['triton']} · {results['date']}",
        *smoke,
        "",
        f"- mechgpu: `step()` with `{results['stubbed']}` replaced by a no-op that counts its calls, so only "
        "mechgpu's Python runs (validation, address checks, table uploads, argument assembly); no kernel runs",
        "- torch: its own `step()`, **not stubbed**: the time includes its math "
        f"(fp32 tensors of {results['numel']} elements, and of {results['floor_numel']} for its floor)",
        "- time: `time.perf_counter` around each `step()` alone (on a GPU, a sync just before it; the garbage "
        f"collector off, as in `timeit`), median and p90 of {timing['steps']} steps "
        f"after {timing['warmup_steps']} untimed ones; µs/tensor = median / tensors; "
        f"{results['torch_threads']} torch threads",
        f"- 1-minute load average {load['start']:.2f} at the start, {load['end']:.2f} at the end "
        f"({os_cpus} CPUs): other work on the machine slows every row. CPU µs: the median of the timing "
        "thread's own CPU time (`time.thread_time`) per step; well below the median µs, the machine was busy "
        "(torch's worker threads are not in it)",
        "- grads `same`: the same grad tensors every step (`zero_grad(set_to_none=False)`); `new`: a fresh grad "
        "per param every step, made before the old ones are dropped (`zero_grad()` + backward)",
        "- AdamW + clip: mechgpu `max_grad_norm=1.0` (norm + step launch); torch "
        "`clip_grad_norm_(params, 1.0, foreach=True)` + `step()`, both timed. SGD: momentum 0.9",
        f"- mechgpu.optim imported from `{source['path']}` (sources sha1 {source['sha1']})",
        "",
    ]

    header = ["tensors", "case", "grads", "implementation", "elements/tensor", "launches/step", "median µs",
              "p90 µs", "µs/tensor", "CPU µs"]
    rows, errors = [], []
    for r in results["rows"]:
        launches = "–" if r["launches_per_step"] is None else "/".join(map(str, r["launches_per_step"]))
        median = common.cell(r["median_us"], ",.1f")
        if r["error"] is not None:
            median = "failed"
            errors.append(f"- {r['tensors']:,} x {r['numel']} {r['case']} {r['regime']} "
                          f"{r['implementation']}: {r['error']}")
        rows.append([f"{r['tensors']:,}", r["case"], r["regime"], r["implementation"], str(r["numel"]), launches,
                     median, common.cell(r["p90_us"], ",.1f"), common.cell(r["us_per_tensor"], ".3f"),
                     common.cell(r["cpu_median_us"], ",.1f")])
    table = common.markdown_table(header, rows, text_columns=4)
    failures = ["", "Failures:", *errors] if errors else []
    return "\n".join(head + [table] + failures)


def write(out_dir: Path, results: dict, markdown: str) -> tuple[Path, Path]:
    """``<out_dir>/step-overhead-<device>[-<label>].json`` and ``.md``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    label = f"-{common.device_slug(results['label'])}" if results["label"] else ""
    stem = out_dir / f"{BENCHMARK}-{common.device_slug(results['device'])}{label}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE['steps']} steps after {SMOKE['warmup']} on {SMOKE['tensors'][0]} tensors; "
                             "writes to a temporary folder unless --out")
    parser.add_argument("--tensors", nargs="+", type=int, default=list(TENSOR_COUNTS),
                        help=f"tensor counts (default: {' '.join(map(str, TENSOR_COUNTS))})")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="default: all")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"timed steps per row (default: {STEPS})")
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS,
                        help=f"untimed steps first (default: {WARMUP_STEPS})")
    parser.add_argument("--label", default=None, help="names the run in the report and the file name, "
                                                      "e.g. before/after")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {common.RESULTS_DIR})")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first step builds states and caches)")

    counts, steps, warmup = (SMOKE["tensors"], SMOKE["steps"], SMOKE["warmup"]) if args.smoke else (
        tuple(args.tensors), args.steps, args.warmup)
    out = common.output_dir(args.out, args.smoke)
    results = run(args.cases, counts, steps=steps, warmup=warmup, label=args.label, smoke=args.smoke)
    markdown = to_markdown(results)
    print()
    print(markdown)
    json_path, md_path = write(out, results, markdown)
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
