"""Benchmark: mechgpu.nn.functional activations against torch eager and torch.compile.

What it measures
----------------
For sigmoid, tanh, relu, leaky_relu (slope 0.01), gelu, gelu('tanh') and silu, on one
flat tensor of 1M to 256M elements in fp32 and bf16:

* ``forward``: ``y = act(x)`` with x requiring grad, so each implementation also writes
  what its backward will read (mechgpu's relu/leaky_relu write their bit mask);
* ``backward``: the backward kernel alone, from the upstream gradient g and the saved
  tensor: mechgpu's backward op, torch's ATen backward op (``sigmoid_backward``,
  ``threshold_backward``, ``gelu_backward``, ...), and that ATen op under torch.compile;
* ``forward+backward``: ``y = act(x)`` then ``torch.autograd.grad(y, x, g)``.

Each implementation is timed with the median of ``triton.testing.do_bench``. GB/s counts
the bytes each implementation must move at least: the forward reads x and writes y (plus
the 1/8 B bit mask for mechgpu's relu/leaky_relu); the backward reads g and the saved
tensor and writes dx (mechgpu's relu/leaky_relu read 1/8 B of mask instead of a whole
saved tensor). Each row also gives that as a fraction of the device-to-device copy
bandwidth measured in the same run, and mechgpu's speedup over torch eager and over
torch.compile. A second table gives the bytes each implementation saves for backward per
element, measured with ``torch.autograd.graph.saved_tensors_hooks`` (for torch.compile:
what its compiled graph saves). Results go to ``bench/results/<device>-activations.json``
and ``.md``.

Targets on an H100: at least 90% of copy bandwidth for mechgpu's forward and backward at
>= 16M elements; forward+backward faster than torch eager for every activation; relu and
leaky_relu save 1/32 of torch's bytes in fp32.

How to run
----------
    python bench/activations.py                              # everything; needs CUDA and ~8 GB
    python bench/activations.py --activations gelu silu --dtypes bf16 --sizes 16M 64M
    python bench/activations.py --no-compile                 # skip the torch.compile columns
    python bench/activations.py --smoke                      # a tiny run, works on a CPU-only machine
"""

from __future__ import annotations

from collections.abc import Callable

import _common as common
import torch
import torch.nn.functional as F
from mechgpu.kernels import activation as kernels

import mechgpu.nn.functional as MF
from mechgpu import traffic

SLOPE = 0.01
aten = torch.ops.aten
mechgpu_ops = torch.ops.mechgpu

# name: (kernel kind, mechgpu forward, torch forward, mechgpu backward(g, x, y), torch backward(g, x, y))
ACTIVATIONS: dict[str, tuple] = {
    "sigmoid": ("sigmoid", MF.sigmoid, torch.sigmoid,
                lambda g, x, y, m: mechgpu_ops.sigmoid_backward(g, y),
                lambda g, x, y: aten.sigmoid_backward(g, y)),
    "tanh": ("tanh", MF.tanh, torch.tanh,
             lambda g, x, y, m: mechgpu_ops.tanh_backward(g, y),
             lambda g, x, y: aten.tanh_backward(g, y)),
    "relu": ("relu", MF.relu, F.relu,
             lambda g, x, y, m: mechgpu_ops.relu_backward(g, m),
             lambda g, x, y: aten.threshold_backward(g, y, 0)),
    "leaky_relu": ("leaky_relu", lambda x: MF.leaky_relu(x, SLOPE), lambda x: F.leaky_relu(x, SLOPE),
                   lambda g, x, y, m: mechgpu_ops.leaky_relu_backward(g, m, SLOPE),
                   lambda g, x, y: aten.leaky_relu_backward(g, x, SLOPE, False)),
    "gelu": ("gelu", MF.gelu, F.gelu,
             lambda g, x, y, m: mechgpu_ops.gelu_backward(g, x, "none"),
             lambda g, x, y: aten.gelu_backward(g, x)),
    "gelu_tanh": ("gelu_tanh", lambda x: MF.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"),
                  lambda g, x, y, m: mechgpu_ops.gelu_backward(g, x, "tanh"),
                  lambda g, x, y: aten.gelu_backward(g, x, approximate="tanh")),
    "silu": ("silu", MF.silu, F.silu,
             lambda g, x, y, m: mechgpu_ops.silu_backward(g, x),
             lambda g, x, y: aten.silu_backward(g, x)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = {"1M": 1 << 20, "4M": 1 << 22, "16M": 1 << 24, "64M": 1 << 26, "256M": 1 << 28}
SMOKE_SIZES = {"4k+77": 4096 + 77}
DIRECTIONS = ("forward", "backward", "forward+backward")
IMPLEMENTATIONS = ("mechgpu", "torch eager", "torch compile")


def bytes_per_element(activation: str, direction: str, implementation: str, element_size: int) -> float:
    """The least an implementation must read and write per element in one direction
    (``mechgpu.traffic.activation_bytes``; torch saves a tensor where mechgpu saves a bit mask)."""
    kind = ACTIVATIONS[activation][0]
    return traffic.activation_bytes(kind, direction, element_size,
                                    mask=None if implementation == "mechgpu" else False)


def saved_bytes_per_element(fn: Callable, x: torch.Tensor) -> float | None:
    """Bytes autograd keeps for backward after ``fn(x)``, per element of x (None if unmeasurable)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
    except Exception:  # torch.compile may refuse saved-tensor hooks
        return None
    return sum(saved) / x.numel()


def make_calls(activation: str, implementation: str, x: torch.Tensor, g: torch.Tensor,
               compiled: dict) -> dict[str, Callable[[], object]]:
    """The three timed calls of one implementation, on inputs x (requires grad) and g."""
    kind, ours, theirs, ours_bwd, theirs_bwd = ACTIVATIONS[activation]
    if implementation == "mechgpu":
        forward = ours
        y = ours(x).detach()
        mask = None
        if kind in kernels.MASK_KINDS:
            mask = kernels.forward(x.detach(), kind, slope=SLOPE, save_mask=True)[1]

        def backward():
            return ours_bwd(g, x.detach(), y, mask)
    else:
        key = (activation, x.dtype)
        if implementation == "torch compile":
            if key not in compiled:
                compiled[key] = (torch.compile(theirs, dynamic=True),
                                 torch.compile(theirs_bwd, dynamic=True))
            forward, backward_op = compiled[key]
        else:
            forward, backward_op = theirs, theirs_bwd
        y = theirs(x).detach()

        def backward():
            return backward_op(g, x.detach(), y)

    def forward_backward():
        return torch.autograd.grad(forward(x), x, g)

    return {"forward": lambda: forward(x), "backward": backward, "forward+backward": forward_backward}


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------
def run(activations: list[str], dtypes: list[str], sizes: dict[str, int], *, with_compile: bool,
        quick: bool) -> dict:
    """Benchmark every activation, dtype, size and direction; returns the results as written to JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = common.run_header("activations", device, quick=quick)
    copy = header["copy"]
    implementations = [i for i in IMPLEMENTATIONS if with_compile or i != "torch compile"]
    results = {
        **header,
        "leaky_relu_slope": SLOPE,
        "implementations": implementations,
        "sizes": sizes,
        "rows": [],
        "saved": [],
    }
    compiled: dict = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        element_size = torch.empty((), dtype=dtype).element_size()
        for activation in activations:
            for size_name, numel in sizes.items():
                x = torch.randn(numel, device=device, generator=gen).to(dtype).requires_grad_()
                g = torch.randn(numel, device=device, generator=gen).to(dtype)
                timings = {}
                for implementation in implementations:
                    try:
                        calls = make_calls(activation, implementation, x, g, compiled)
                        for call in calls.values():  # compile and warm up
                            call()
                        common.synchronize()
                        timings[implementation] = {d: {"ms": common.median_ms(calls[d], quick=quick), "error": None}
                                                   for d in DIRECTIONS}
                    except Exception as exc:
                        if implementation != "torch compile":
                            raise
                        message = str(exc).strip().splitlines()
                        error = f"{type(exc).__name__}: {message[0] if message else ''}"
                        timings[implementation] = {d: {"ms": None, "error": error} for d in DIRECTIONS}
                    common.free_memory()
                for direction in DIRECTIONS:
                    row = {"activation": activation, "dtype": dtype_name, "size": size_name, "numel": numel,
                           "direction": direction, "results": {}}
                    for implementation in implementations:
                        entry = dict(timings[implementation][direction])
                        moved = bytes_per_element(activation, direction, implementation, element_size) * numel
                        entry["bytes"] = moved
                        entry["gbps"] = None if entry["ms"] is None else common.gbps(moved, entry["ms"])
                        entry["copy_fraction"] = None if entry["ms"] is None else entry["gbps"] / copy["gbps"]
                        row["results"][implementation] = entry
                    ours = row["results"]["mechgpu"]["ms"]
                    for implementation in implementations[1:]:
                        theirs = row["results"][implementation]["ms"]
                        row["results"][implementation]["mechgpu_speedup"] = \
                            None if theirs is None else theirs / ours
                    results["rows"].append(row)
                    print(f"{activation} {dtype_name} {size_name} {direction}: " + ", ".join(
                        f"{i} {row['results'][i]['ms']:.4f} ms" if row["results"][i]["ms"] is not None
                        else f"{i} failed" for i in implementations), flush=True)
                del x, g
                common.free_memory()
            results["saved"].append(measure_saved(activation, dtype, dtype_name, device, compiled,
                                                  implementations, min(sizes.values())))
    return results


def measure_saved(activation: str, dtype: torch.dtype, dtype_name: str, device: torch.device,
                  compiled: dict, implementations: list[str], numel: int) -> dict:
    """Bytes saved for backward per element by each implementation."""
    _, ours, theirs, _, _ = ACTIVATIONS[activation]
    x = torch.randn(numel, device=device).to(dtype).requires_grad_()
    fns = {"mechgpu": ours, "torch eager": theirs}
    if "torch compile" in implementations and (activation, dtype) in compiled:
        fns["torch compile"] = compiled[(activation, dtype)][0]
    entry = {"activation": activation, "dtype": dtype_name, "numel": numel,
             "bytes_per_element": {name: saved_bytes_per_element(fn, x) for name, fn in fns.items()}}
    ours_b, eager_b = entry["bytes_per_element"]["mechgpu"], entry["bytes_per_element"]["torch eager"]
    entry["mechgpu_over_eager"] = ours_b / eager_b if eager_b else None
    return entry


def to_markdown(results: dict) -> str:
    """The results as a markdown report: what was measured, a timing table, a saved-bytes table."""
    implementations = results["implementations"]
    head = common.report_head(results, "mechgpu.nn.functional activations vs torch eager and torch.compile",
                              ", after an untimed warm-up call", [
        "- forward: `y = act(x)` with x requiring grad; backward: the backward op alone from g and the "
        "saved tensor; forward+backward: `torch.autograd.grad(act(x), x, g)`",
        "- GB/s: the bytes each implementation must move (forward: read x, write y; backward: read g "
        "and the saved tensor, write dx; mechgpu's relu/leaky_relu: + or instead 1/8 B of bit mask) / ms",
        "- speedup: torch's ms / mechgpu's ms",
        f"- leaky_relu slope {results['leaky_relu_slope']}",
    ])

    header = ["activation", "dtype", "elements", "direction", "mechgpu ms", "GB/s", "of copy BW"]
    for implementation in implementations[1:]:
        header += [f"{implementation} ms", f"vs {implementation}"]
    rows, errors = [], set()
    for r in results["rows"]:
        ours = r["results"]["mechgpu"]
        line = [r["activation"], r["dtype"], r["size"], r["direction"], common.cell(ours["ms"], ".4f"),
                common.cell(ours["gbps"], ",.0f"), common.cell(ours["copy_fraction"], ".0%")]
        for implementation in implementations[1:]:
            theirs = r["results"][implementation]
            if theirs["error"]:
                errors.add(f"- {r['activation']} {r['dtype']} {implementation}: {theirs['error']}")
            speedup = theirs.get("mechgpu_speedup")
            line += [common.cell(theirs["ms"], ".4f") if not theirs["error"] else "failed",
                     "–" if speedup is None else f"{speedup:.2f}x"]
        rows.append(line)
    saved_header = ["activation", "dtype"] + [f"{i} B/element" for i in implementations] + ["mechgpu / eager"]
    saved_rows = []
    for s in results["saved"]:
        per = s["bytes_per_element"]
        saved_rows.append([s["activation"], s["dtype"]] + [common.cell(per.get(i), ".4g") for i in implementations]
                          + [common.cell(s["mechgpu_over_eager"], ".4g")])
    failures = ["", "Failures:", *sorted(errors)] if errors else []
    return "\n".join(head + [common.markdown_table(header, rows, text_columns=4), "",
                             "Bytes saved for backward per element (`saved_tensors_hooks`):", "",
                             common.markdown_table(saved_header, saved_rows, text_columns=2)] + failures)


def main(argv: list[str] | None = None) -> None:
    parser, which = common.bench_parser(__doc__, f"tiny run on {', '.join(SMOKE_SIZES)} elements timed with "
                                          "time.perf_counter, no torch.compile")
    which.add_argument("--sizes", nargs="+", choices=list(SIZES), help="default: all")
    parser.add_argument("--activations", nargs="+", choices=list(ACTIVATIONS), default=list(ACTIVATIONS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    args = common.parse_bench_args(parser, argv)
    sizes = SMOKE_SIZES if args.smoke else {name: SIZES[name] for name in args.sizes or SIZES}
    results = run(args.activations, args.dtypes, sizes, with_compile=not (args.smoke or args.no_compile),
                  quick=args.smoke)
    common.publish(args.out, "activations", results, to_markdown(results))


if __name__ == "__main__":
    main()
