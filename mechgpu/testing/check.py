"""``mechgpu check``: every case of the database (``CASES``) against PyTorch's own implementation,
on this device; the same cases tests/test_cases.py runs. Here: running them, the table, the JSON
and the command line. ``mechgpu check --list`` prints the case names.

Inputs are random, from a new seed each run unless ``--seed`` is given (the seed is printed), with
awkward sizes (1, odd, non-powers of 2, more than one block). The pass rule and the tolerances are
``compare``'s. A case that raises counts as a failure, with its message; the run goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch

from . import activation_cases, clip_cases, init_cases, optim_cases
from .compare import Row
from .environment import (
    MIN_COMPUTE_CAPABILITY,
    cuda_problem,
    environment,
    header_lines,
    installed_triton_version,
    triton_version_problem,
)
from .registry import Context, collect

CASES = collect(optim_cases, clip_cases, activation_cases, init_cases)


def families() -> list[str]:
    """The kernel families, in the order their cases run: optim, clip, act, init."""
    return list(dict.fromkeys(case.family for case in CASES.values()))


def select_cases(only: Iterable[str] | None = None, *, exact: bool = False) -> list[str]:
    """The case names containing any of ``only``, ignoring case (equal to one, with ``exact``; all
    when empty); ValueError when none does."""
    only = list(only or [])
    names = [name for name in CASES
             if not only or any(part == name if exact else part.lower() in name.lower() for part in only)]
    if not names:
        raise ValueError(f"no check name contains {' or '.join(map(repr, only))}; "
                         "`mechgpu check --list` prints the names")
    return names


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


def _describe(exc: BaseException) -> str:
    """The exception and the innermost frame it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}"


def run_checks(device: str | torch.device, quick: bool = False, only: Iterable[str] | None = None,
               seed: int | None = None, report: Callable[[Row], None] | None = None, *,
               exact: bool = False) -> list[Row]:
    """Run the selected cases (``select_cases``) on ``device`` and return their rows (``report``
    sees each as it comes).

    On a CPU the kernels need TRITON_INTERPRET=1 set before triton was imported; without it
    mechgpu would quietly run torch's own code, so that raises instead.
    """
    from .._backend import kernels_run_on

    device = torch.device(device)
    if not kernels_run_on(device):
        raise RuntimeError(f"mechgpu's kernels cannot run on {device}: on a CPU they need TRITON_INTERPRET=1 "
                           "set before triton is imported (`mechgpu check --device cpu` does that)")
    names = select_cases(only, exact=exact)
    seed = fresh_seed() if seed is None else seed
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow in the interpreter on inf inputs
        for name in names:
            ctx = Context(device, quick, seed, name)
            produced = []
            try:
                for row in CASES[name].run(ctx):
                    produced.append(row)
                    if report:
                        report(row)
            except Exception as exc:  # a crash is a failure of this case, not of the run
                row = Row(name, "raised an exception", "-", None, None, "-", None, False, _describe(exc))
                produced.append(row)
                if report:
                    report(row)
            rows += produced
    return rows


def _number(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.2e}" if math.isfinite(x) else str(x)


class TablePrinter:
    """Prints rows as they arrive, in fixed columns."""

    COLUMNS = (("check", 36), ("dtype", 5), ("max abs err", 11), ("max rel err", 11), ("tolerance", 30),
               ("err/tol", 8), ("result", 6))

    def __init__(self, case_width: int, out=None) -> None:
        self.case_width = max(case_width, len("case"))
        self.out = out or sys.stdout

    def _line(self, cells: list[str]) -> str:
        widths = [self.case_width] + [w for _, w in self.COLUMNS]
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    def header(self) -> None:
        print(self._line(["case"] + [name for name, _ in self.COLUMNS]), file=self.out)
        print(self._line(["-" * self.case_width] + ["-" * w for _, w in self.COLUMNS]), file=self.out)

    def row(self, row: Row) -> None:
        cells = [row.case, row.check, row.dtype, _number(row.max_abs), _number(row.max_rel), row.tolerance,
                 _number(row.err_over_tol), "ok" if row.passed else "FAIL"]
        print(self._line(cells), file=self.out, flush=True)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, env: dict, seed: int, quick: bool, rows: list[Row], seconds: float) -> None:
    """The header, the summary and every row; non-finite errors are written as strings."""
    failed = sum(not r.passed for r in rows)
    doc = {"environment": env, "seed": seed, "quick": quick, "checks": len(rows), "failed": failed,
           "seconds": round(seconds, 2), "rows": [asdict(r) for r in rows]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_json_safe(doc), indent=1) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mechgpu check``'s options (imports nothing: triton must not be loaded yet)."""
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and steps (1 to 2 minutes on a 2-core CPU, kernels in the interpreter)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu (kernels in triton's interpreter)")
    parser.add_argument("--only", action="append", default=None, metavar="SUBSTR",
                        help="run the cases whose name contains SUBSTR, ignoring case (may be given several times; "
                             "--list prints the names)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: a fresh one)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the environment and every row as JSON to PATH")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")


def run(args: argparse.Namespace, select_device: Callable[[str | None], str]) -> int:
    """The ``mechgpu check`` command: 0 when every check passes, 1 on a failure, 2 when it cannot run."""
    if args.list:
        for name in CASES:
            print(name)
        return 0
    try:
        names = select_cases(args.only)
    except ValueError as exc:
        print(f"mechgpu check: {exc}", file=sys.stderr)
        return 2
    if problem := cuda_problem(args.device):
        print(f"mechgpu check: {problem}", file=sys.stderr)
        return 2
    device = select_device(args.device)
    problem = triton_version_problem(installed_triton_version())
    if problem:
        print(problem, file=sys.stderr)
        return 2

    env = environment(device)
    seed = fresh_seed() if args.seed is None else args.seed
    print("mechgpu check: every kernel against PyTorch's own implementation")
    for line in header_lines(env, seed, args.quick):
        print(line)
    if device == "cuda":
        capability = tuple(map(int, env["compute_capability"].split(".")))
        if capability < MIN_COMPUTE_CAPABILITY:
            print(f"warning: compute capability {env['compute_capability']} is below "
                  f"{'.'.join(map(str, MIN_COMPUTE_CAPABILITY))}; mechgpu's kernels are built for sm_80 and "
                  "newer (bf16 needs it), so some checks may fail here")
    print()

    table = TablePrinter(max(len(n) for n in names))
    table.header()
    start = time.perf_counter()
    try:
        rows = run_checks(device, quick=args.quick, only=args.only, seed=seed, report=table.row)
    except RuntimeError as exc:
        print(f"mechgpu check: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    failed = [r for r in rows if not r.passed]
    if failed:
        print("\nfailures:")
        for r in failed:
            print(f"  {r.case} / {r.check} / {r.dtype}: {r.note}")
    print(f"\n{len(rows)} checks, {len(failed)} failed ({seconds:.1f} s)")
    if args.json:
        write_json(args.json, env, seed, args.quick, rows, seconds)
        print(f"wrote {args.json}")
    return 1 if failed else 0
