#!/usr/bin/env python3
"""Compile report for every mechgpu kernel, ahead of time, with no GPU needed.

For each kernel variant and each arch (sm_80, sm_90a): registers per thread, spilled
bytes, and the number of 128-bit global loads and stores (LDG.E.128 / STG.E.128) in the
SASS, read with the ptxas and cuobjdump shipped in the triton wheel.

    python bench/kernel_report.py                 # a table
    python bench/kernel_report.py --json out.json # also a list of {kernel, arch, registers, spills, ldg128, stg128}
    python bench/kernel_report.py --only adam     # variants whose name contains "adam"
"""

from __future__ import annotations

import argparse
import json
import sys

from mechgpu.kernels import aot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout)")
    parser.add_argument("--only", default="", help="only kernel variants whose name contains this")
    args = parser.parse_args(argv)

    variants = [v for v in aot.all_variants() if args.only in v.name]
    rows = [aot.inspect_variant(v, arch) for v in variants for arch in aot.ARCHS]
    keys = ("kernel", "arch", "registers", "spills", "ldg128", "stg128")
    if args.json:
        text = json.dumps([{k: getattr(r, k) for k in keys} for r in rows], indent=1)
        if args.json == "-":
            print(text)
            return 0
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(f"{'kernel':<40} {'arch':<7} {'regs':>5} {'spills':>7} {'LDG.128':>8} {'STG.128':>8}")
    for r in rows:
        print(f"{r.kernel:<40} {r.arch:<7} {r.registers:>5} {r.spills:>7} {r.ldg128:>8} {r.stg128:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
