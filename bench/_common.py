"""Helpers shared by the benchmarks in ``bench/``: timing, copy bandwidth, command line, result files.

Without a GPU, mechgpu's kernels can only run in Triton's interpreter (a script's --smoke
run), and triton reads ``TRITON_INTERPRET`` when it is first imported. So this module sets
it before it imports triton, and every benchmark imports it before anything that imports
triton (mechgpu does).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.testing  # noqa: E402

from mechgpu.tools.bench import device_slug  # noqa: E402, F401  (one home: the merged results use it too)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# triton.testing.do_bench runs the function for WARMUP_MS, then times it for REP_MS.
# A second of repetitions gives ~100 samples even for a 10 ms step over 1e9 parameters.
# A budgeted run (bench/device_session.py) shortens both with --warmup-ms and --rep-ms.
WARMUP_MS = 100
REP_MS = 1000
# The quick timer (smoke runs, where kernels may run in Triton's slow CPU interpreter).
QUICK_REPS = 5
# Host time of one call (host_ms): the median of this many calls, each after a synchronize.
HOST_CALLS = 20


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--warmup-ms`` and ``--rep-ms``: do_bench's warm-up and repetition time."""
    parser.add_argument("--warmup-ms", type=float, default=WARMUP_MS,
                        help=f"do_bench warm-up per timed call, ms (default: {WARMUP_MS})")
    parser.add_argument("--rep-ms", type=float, default=REP_MS,
                        help=f"do_bench repetition time per timed call, ms (default: {REP_MS})")


def set_timing(args: argparse.Namespace) -> None:
    """Apply ``--warmup-ms`` and ``--rep-ms`` to every later ``median_ms`` call."""
    global WARMUP_MS, REP_MS
    WARMUP_MS, REP_MS = args.warmup_ms, args.rep_ms


def bench_parser(doc: str, smoke: str, *, timed: bool = True) -> tuple[argparse.ArgumentParser,
                                                                      argparse._MutuallyExclusiveGroup]:
    """A benchmark's command line: ``--smoke`` (``smoke`` says what it runs), ``--out`` and, when
    ``timed``, the do_bench options. Returns the parser and the group ``--smoke`` is in, for the
    script's size option (``--lists``, ``--sizes``), which ``--smoke`` replaces."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--smoke", action="store_true",
                       help=f"{smoke}; works without a GPU; writes to a temporary folder unless --out")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {RESULTS_DIR})")
    if timed:
        add_timing_arguments(parser)
    return parser, which


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, apply the timing options, refuse a full run without CUDA, and resolve ``--out``."""
    args = parser.parse_args(argv)
    if hasattr(args, "warmup_ms"):
        set_timing(args)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device; --smoke runs on a CPU-only machine")
    args.out = output_dir(args.out, args.smoke)
    return args


def synchronize() -> None:
    """Wait for all queued GPU work; nothing to wait for without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], *, quick: bool = False) -> float:
    """Median time of one ``fn()`` in milliseconds.

    By default this is ``triton.testing.do_bench``: CUDA events around every call and the
    L2 cache flushed between calls. With ``quick=True`` it is the median of QUICK_REPS
    calls timed with ``time.perf_counter``, synchronising before and after each call; that
    works on a CPU-only machine but is only a smoke test, not a GPU measurement.
    """
    if not quick:
        return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    times = []
    for _ in range(QUICK_REPS):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def graph_ms(fn: Callable[[], object]) -> float | None:
    """Median device time of one ``fn()`` replayed from a CUDA graph, in ms; None without CUDA.

    For many small tensors a step's host work (Python, launches) can exceed its kernel
    time, and ``do_bench``'s events then time the host. A graph replays only the kernels.
    ``fn`` must be capturable (torch's optimizers need ``capturable=True``) and warmed up.
    The graph is captured on a side stream, replayed REP_MS long, and released.
    """
    if not torch.cuda.is_available():
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # one eager call on the capture stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return triton.testing.do_bench(graph.replay, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    finally:
        del graph
        free_memory()


def host_ms(fn: Callable[[], object]) -> float:
    """Median host time of one ``fn()`` call, in ms: from the call until it returns, the device
    idle at the start of each (synchronised before), its queued work not waited for."""
    times = []
    for _ in range(HOST_CALLS):
        synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    synchronize()
    return 1e3 * statistics.median(times)


def gbps(nbytes: int, ms: float) -> float:
    """Bytes moved in ``ms`` milliseconds, as decimal GB per second."""
    return nbytes / ms / 1e6


def copy_bandwidth(device: torch.device, buffer_bytes: int, *, quick: bool = False) -> dict:
    """The device's copy bandwidth: ``dst.copy_(src)`` on an fp32 buffer of ``buffer_bytes``.

    A copy reads and writes every byte, so it moves 2 x buffer_bytes. This is the practical
    ceiling for any kernel that streams memory; benchmarks report their fraction of it.
    The buffers are released on return; call ``free_memory()`` to hand them back to the device.
    """
    src = torch.empty(buffer_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), quick=quick)
    moved = 2 * buffer_bytes
    return {"buffer_bytes": buffer_bytes, "bytes": moved, "ms": ms, "gbps": gbps(moved, ms)}


def run_header(benchmark: str, device: torch.device, *, quick: bool, copy_bytes: int = 1 << 30) -> dict:
    """The head every result file starts with: environment, timing method, copy bandwidth.

    The copy is measured on ``copy_bytes`` (default 1 GiB) on a GPU (1 MiB for a smoke run) and
    released again.
    """
    copy = copy_bandwidth(device, (1 << 20) if quick else copy_bytes, quick=quick)
    free_memory()
    timing = ({"method": "time.perf_counter median", "reps": QUICK_REPS} if quick else
              {"method": "triton.testing.do_bench median", "warmup_ms": WARMUP_MS, "rep_ms": REP_MS})
    timing["host_calls"] = HOST_CALLS
    return {**environment(device), "benchmark": benchmark, "timing": timing, "copy": copy}


def copy_line(copy: dict) -> str:
    """The report line that states the copy bandwidth every fraction is taken of."""
    return (f"- copy bandwidth: {copy['gbps']:,.1f} GB/s (`dst.copy_(src)` on "
            f"{copy['buffer_bytes'] / 2**20:,.0f} MiB of fp32; a copy moves twice the buffer)")


def report_head(results: dict, title: str, timed: str, bullets: list[str]) -> list[str]:
    """A report's first lines: its title, the environment, how the times were taken (``timed``:
    what each timed call is), the copy bandwidth, the script's own ``bullets``, and the
    parameter lists where the results have them."""
    lines = [f"# {title}", "",
             f"{results['device']} · torch {results['torch']} · triton {results['triton']} · {results['date']}", "",
             f"- time: {timing_line(results['timing'], timed)}", copy_line(results["copy"]), *bullets]
    if "lists" in results:
        lines.append("- lists: " + "; ".join(f"{name} {info['tensors']:,} tensors, {info['params']:,} params"
                                             for name, info in results["lists"].items()))
    return lines + [""]


def timing_line(timing: dict, what: str) -> str:
    """How the times were taken: ``what`` names the timed call and its untimed warm-up."""
    if timing["method"].startswith("time.perf_counter"):
        return (f"smoke run: median of {timing['reps']} calls timed with `time.perf_counter` "
                "(on a CPU the kernels run in Triton's interpreter); not a speed measurement")
    return f"median of `triton.testing.do_bench` (warmup {timing['warmup_ms']} ms, rep {timing['rep_ms']} ms){what}"


def output_dir(out: Path | None, smoke: bool) -> Path:
    """--out if given; else a temporary folder for a smoke run, bench/results otherwise."""
    return out or (Path(tempfile.mkdtemp(prefix="mechgpu-bench-")) if smoke else RESULTS_DIR)


def publish(out_dir: Path, benchmark: str, results: dict, markdown: str) -> None:
    """Print the report and write it with its JSON (``write_results``)."""
    print()
    print(markdown)
    json_path, md_path = write_results(out_dir, benchmark, results, markdown)
    print(f"\nwrote {json_path} and {md_path}")


def free_memory() -> None:
    """Collect unreachable tensors and hand torch's cached CUDA memory back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    """``mechgpu check``'s environment reader (device, driver, CUDA runtime, library versions,
    date), with ``device`` the name the result files go by: the GPU's, or "cpu"."""
    from mechgpu.testing.environment import environment as read_environment

    env = read_environment(device)
    return {**env, "device": env["device_name"] if device.type == "cuda" else "cpu"}


def cell(value: float | None, spec: str) -> str:
    """A table cell: ``value`` formatted with ``spec``, or a dash where there is none."""
    return "–" if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]], *, text_columns: int = 1) -> str:
    """A GitHub markdown table: the first ``text_columns`` left-aligned, the rest (numbers) right."""
    align = [":---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, benchmark: str, results: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<device-slug>-<benchmark>.json`` and ``.md``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{device_slug(results['device'])}-{benchmark}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown + "\n")
    return json_path, md_path
