#!/usr/bin/env python3
"""Compile report for every mechgpu kernel, ahead of time, with no GPU needed.

For each kernel variant (every ``*_kernel`` in ``kernels/``, in each specialisation the
launchers use; see ``aot_variants()`` in each module) and each arch (sm_80, sm_90a):
registers per thread, spilled bytes, the number of 128-bit global loads and stores
(LDG.E.128 / STG.E.128) and of CTA barriers inside loops (``aot.loop_barriers``: in a grid-stride
kernel, the barriers every block pays) in the SASS, read with the ptxas and cuobjdump shipped in
the triton wheel.

    python bench/kernel_report.py                 # a table
    python bench/kernel_report.py --out bench/results   # also kernel-report.json and .md there
    python bench/kernel_report.py --json -        # the JSON on stdout
    python bench/kernel_report.py --only adam     # variants whose name contains "adam"
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import triton
from mechgpu.kernels import aot

ROW_KEYS = ("kernel", "arch", "registers", "spills", "ldg128", "stg128", "num_warps", "shared", "loop_barriers",
            "ctas_per_sm", "warps_per_sm")


def report(only: str = "") -> dict:
    """Environment, summary and one row per (variant, arch)."""
    variants = [v for v in aot.all_variants() if only in v.name]
    rows = [aot.inspect_variant(v, arch) for v in variants for arch in aot.ARCHS]
    rows = [{k: getattr(r, k) for k in ROW_KEYS} for r in rows]
    aligned = [v.name for v in variants if v.expect_ldg128 or v.expect_stg128]
    wide = {r["kernel"] for r in rows if r["ldg128"] or r["stg128"]}
    return {
        "benchmark": "kernel-report", "device": "none (ahead-of-time compile)",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "archs": list(dict.fromkeys(r["arch"] for r in rows)), "variants": len(variants),
        "kernels": sorted({v.fn.__name__ for v in variants}),
        "summary": {"max_registers": max((r["registers"] for r in rows), default=0),
                    "spills": sum(r["spills"] for r in rows),
                    "min_ctas_per_sm": min((r["ctas_per_sm"] for r in rows), default=0),
                    "below_occupancy_floor": sum(not aot.meets_occupancy_floor(r["ctas_per_sm"], r["warps_per_sm"])
                                                 for r in rows),
                    "loop_barriers": sum(r["loop_barriers"] for r in rows),
                    "with_loop_barriers": sum(r["loop_barriers"] > 0 for r in rows),
                    "with_shared": sum(r["shared"] > 0 for r in rows),
                    "aligned_variants": len(aligned),
                    "aligned_with_128bit_access": sum(name in wide for name in aligned)},
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    s = result["summary"]
    lines = ["# Kernel compile report (ahead of time, no GPU)", "",
             f"`python bench/kernel_report.py --out bench/results`, triton {result['triton']}, "
             f"{result['date'][:10]}. {result['variants']} variants of {len(result['kernels'])} kernels for "
             f"{', '.join(result['archs'])}: at most {s['max_registers']} registers, {s['spills']} spilled bytes, "
             f"{s['aligned_with_128bit_access']} of {s['aligned_variants']} aligned variants with 128-bit access.",
             f"{s['below_occupancy_floor']} rows below {aot.CTAS_FLOOR} CTAs or {aot.WARPS_FLOOR} warps per SM; "
             f"{s['with_loop_barriers']} rows with CTA barriers inside a loop ({s['loop_barriers']} in all), "
             f"{s['with_shared']} with shared memory.",
             "Registers per thread, spilled bytes, 128-bit global loads/stores in the SASS, warps and shared "
             "memory per CTA, CTA barriers inside a loop of the SASS (`mechgpu.kernels.aot.loop_barriers`: in a "
             "grid-stride kernel, those every block pays), and the resident CTAs and warps per SM they allow "
             "(`mechgpu.kernels.aot.ctas_per_sm`).",
             "",
             "| kernel | arch | registers | spills | LDG.E.128 | STG.E.128 | warps | shared B | loop barriers "
             "| CTAs/SM | warps/SM |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kernel']} | {r['arch']} | {r['registers']} | {r['spills']} | {r['ldg128']} | {r['stg128']} | "
              f"{r['num_warps']} | {r['shared']} | {r['loop_barriers']} | {r['ctas_per_sm']} | {r['warps_per_sm']} |"
              for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout, nothing else)")
    parser.add_argument("--out", type=Path, help="write kernel-report.json and kernel-report.md in this folder")
    parser.add_argument("--only", default="", help="only kernel variants whose name contains this")
    args = parser.parse_args(argv)

    result = report(args.only)
    text = json.dumps(result, indent=1) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
        return 0
    if args.json:
        Path(args.json).write_text(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel-report.json").write_text(text)
        (args.out / "kernel-report.md").write_text(to_markdown(result))
    print(f"{'kernel':<40} {'arch':<7} {'regs':>5} {'spills':>7} {'LDG.128':>8} {'STG.128':>8} {'warps':>6} "
          f"{'shared':>7} {'loopBAR':>8} {'CTAs/SM':>8} {'warps/SM':>9}")
    for r in result["rows"]:
        print(f"{r['kernel']:<40} {r['arch']:<7} {r['registers']:>5} {r['spills']:>7} "
              f"{r['ldg128']:>8} {r['stg128']:>8} {r['num_warps']:>6} {r['shared']:>7} {r['loop_barriers']:>8} "
              f"{r['ctas_per_sm']:>8} {r['warps_per_sm']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
