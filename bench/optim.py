"""Benchmark: one step of mechgpu.optim against torch.optim's own implementations.

What it measures
----------------
The time of one full ``opt.step()`` on fp32 parameter lists shaped like real models:

* ``gpt2-small``: GPT-2 small's real tensors, 148 of them, 124.4M parameters;
* ``1b``: a Llama of 1.01e9 parameters (TinyLlama-1.1B's shapes, 20 of its 22 layers), 183 tensors;
* ``10k-x-1k``: 10,000 tensors of 1,000 elements, where per-tensor overheads dominate.

Adam and AdamW run as mechgpu, torch ``fused=True``, torch ``foreach=True`` and a
``torch.compile``'d foreach step; SGD (momentum 0.9) as mechgpu, torch fused and torch
foreach; RMSprop as mechgpu and torch foreach (torch has no fused RMSprop). Grads are
random and set once; every implementation takes a few untimed steps first (state
creation, JIT and torch.compile), then the median of ``triton.testing.do_bench`` is taken.

Each row reports the bytes a step must move at least (bytes per element x elements), the
effective GB/s, its fraction of the device-to-device copy bandwidth measured in the same
run, and mechgpu's speedup over each torch implementation. It also gives the host time of
one step (the call until it returns, its kernels not waited for), and, on lists of more than
GRAPH_MIN_TENSORS tensors, the device time of a CUDA-graph replay of the step (torch's
optimizers made with ``capturable=True`` for it): there ``do_bench``'s events would time
the host's Python, not the kernels, so the graph time is the kernel's, and GB/s and the
speedups are taken from it. Results are written to
``bench/results/<device>-optim.json`` and ``.md``, and the table is printed.

How to run
----------
    python bench/optim.py                                   # everything; needs CUDA, see below
    python bench/optim.py --lists gpt2-small --optimizers Adam AdamW --no-compile
    python bench/optim.py --smoke                           # a tiny run, works on a CPU-only machine
    python bench/optim.py --lists 1b --warmup-ms 25 --rep-ms 200   # shorter timing (device session)

Memory peaks at about 21 GB on the ``1b`` list with Adam: 4 GB each of params, grads and
the two states, plus torch foreach's 4 GB temporary. Only one optimizer lives at a time.
torch.compile can take minutes on ``10k-x-1k``; ``warmup_s`` in the JSON records it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import _common as common
import torch

import mechgpu.optim
from mechgpu.traffic import STEP_BYTES

Shapes = list[tuple[int, ...]]


# ----------------------------------------------------------------------------------
# Parameter lists
# ----------------------------------------------------------------------------------
def gpt2_small() -> Shapes:
    """GPT-2 small as in Hugging Face's GPT2LMHeadModel (Conv1D weights are [in, out],
    the LM head is tied to wte): 148 tensors, 124,439,808 parameters."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    block = [(d,), (d,),              # ln_1 weight, bias
             (d, 3 * d), (3 * d,),    # attn.c_attn
             (d, d), (d,),            # attn.c_proj
             (d,), (d,),              # ln_2 weight, bias
             (d, 4 * d), (4 * d,),    # mlp.c_fc
             (4 * d, d), (d,)]        # mlp.c_proj
    return [(vocab, d), (context, d)] + block * layers + [(d,), (d,)]  # wte, wpe, blocks, ln_f


def llama_1b() -> Shapes:
    """A Llama with TinyLlama-1.1B's shapes and 20 of its 22 layers: hidden 2048, 32 query
    and 4 key/value heads of 64, SwiGLU MLP of 5632, vocab 32000, untied LM head.
    183 tensors, 1,011,959,808 parameters."""
    d, kv, ffn, vocab, layers = 2048, 256, 5632, 32000, 20
    layer = [(d,),                                  # input_layernorm (RMSNorm, weight only)
             (d, d), (kv, d), (kv, d), (d, d),      # q, k, v, o projections
             (d,),                                  # post_attention_layernorm
             (ffn, d), (ffn, d), (d, ffn)]          # gate, up, down projections
    return [(vocab, d)] + layer * layers + [(d,), (vocab, d)]  # embed, layers, norm, lm_head


PARAM_LISTS: dict[str, Callable[[], Shapes]] = {
    "gpt2-small": gpt2_small,
    "1b": llama_1b,
    "10k-x-1k": lambda: [(1000,)] * 10_000,
}
SMOKE_LISTS: dict[str, Callable[[], Shapes]] = {"3-x-1k": lambda: [(1000,)] * 3}


def make_params(shapes: Shapes, device: torch.device) -> list[torch.Tensor]:
    """fp32 leaf tensors on ``device``, each with a random grad of its own shape and strides."""
    params = []
    for shape in shapes:
        p = torch.randn(shape, device=device).requires_grad_()
        p.grad = torch.randn_like(p)
        params.append(p)
    return params


# ----------------------------------------------------------------------------------
# Optimizers and their implementations
# ----------------------------------------------------------------------------------
# The least a step must move per parameter element, in bytes, with fp32 params
# (mechgpu/traffic.py): Adam/AdamW 7 x 4 B, SGD with momentum and RMSprop 5 x 4 B.
BYTES_PER_ELEMENT = STEP_BYTES

# torch's defaults, except SGD's momentum.
HYPERPARAMETERS: dict[str, dict] = {"Adam": {}, "AdamW": {}, "SGD": {"momentum": 0.9}, "RMSprop": {}}

IMPLEMENTATIONS = {
    "Adam": ("mechgpu", "torch fused", "torch foreach", "torch compile"),
    "AdamW": ("mechgpu", "torch fused", "torch foreach", "torch compile"),
    "SGD": ("mechgpu", "torch fused", "torch foreach"),
    "RMSprop": ("mechgpu", "torch foreach"),  # torch has no fused RMSprop
}

# Lists of more tensors than this are also timed as a CUDA-graph replay (see the docstring).
GRAPH_MIN_TENSORS = 1000

# Untimed steps before timing. The first creates the optimizer state and JIT-compiles the
# kernels; torch.compile compiles again on the second, once the state exists.
WARMUP_STEPS = 3


def make_step(optimizer: str, implementation: str, params: list[torch.Tensor], *,
              capturable: bool = False) -> Callable[[], object]:
    """A fresh optimizer over ``params``, as a function that takes one step; ``capturable``
    asks torch's for a step a CUDA graph can capture (mechgpu's always is)."""
    kwargs = dict(HYPERPARAMETERS[optimizer])
    if implementation == "mechgpu":
        return getattr(mechgpu.optim, optimizer)(params, **kwargs).step
    torch_optimizer = getattr(torch.optim, optimizer)
    if capturable and optimizer != "SGD":  # torch's SGD has no step tensors and no such option
        kwargs["capturable"] = True
    if implementation == "torch fused":
        return torch_optimizer(params, fused=True, **kwargs).step
    opt = torch_optimizer(params, foreach=True, **kwargs)
    if implementation == "torch foreach":
        return opt.step

    # "torch compile": the usual way to compile an optimizer step.
    @torch.compile(fullgraph=False)
    def step() -> None:
        opt.step()

    return step


def warm_step(optimizer: str, implementation: str, params: list[torch.Tensor], *,
              capturable: bool = False) -> tuple[Callable[[], object], float]:
    """A fresh optimizer's step after WARMUP_STEPS untimed calls, and the seconds they took."""
    start = time.perf_counter()
    step = make_step(optimizer, implementation, params, capturable=capturable)
    for _ in range(WARMUP_STEPS):
        step()
    common.synchronize()
    return step, time.perf_counter() - start


def time_step(optimizer: str, implementation: str, params: list[torch.Tensor], *, quick: bool,
              graph: bool = False) -> dict:
    """Warm up a fresh optimizer, then time one step: {"ms", "host_ms", "graph_ms", "warmup_s", "error"}.

    ``graph`` adds the device time of a CUDA-graph replay, on a second, capturable optimizer.
    Only torch.compile may fail; its error is recorded instead of stopping the run.
    """
    try:
        step, warmup_s = warm_step(optimizer, implementation, params)
    except Exception as exc:
        if implementation != "torch compile":
            raise
        message = str(exc).strip().splitlines()
        return {"ms": None, "host_ms": None, "graph_ms": None, "warmup_s": None,
                "error": f"{type(exc).__name__}: {message[0] if message else ''}"}
    result = {"ms": common.median_ms(step, quick=quick), "host_ms": common.host_ms(step), "graph_ms": None,
              "warmup_s": warmup_s, "error": None}
    if graph and implementation != "torch compile" and not quick:
        del step
        common.free_memory()
        try:
            result["graph_ms"] = common.graph_ms(warm_step(optimizer, implementation, params, capturable=True)[0])
        except Exception as exc:  # a step that cannot be captured keeps its eager time, and says why
            result["graph_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    return result


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------
def run(lists: dict[str, Callable[[], Shapes]], optimizers: list[str], *, with_compile: bool,
        quick: bool) -> dict:
    """Benchmark every optimizer on every list; returns the results as written to JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = common.run_header("optim", device, quick=quick)
    copy = header["copy"]
    results = {
        **header,
        "warmup_steps": WARMUP_STEPS,
        "hyperparameters": HYPERPARAMETERS,
        "bytes_per_element": BYTES_PER_ELEMENT,
        "lists": {},
        "rows": [],
    }
    torch.manual_seed(0)
    for list_name, shapes in lists.items():
        params = make_params(shapes(), device)
        numel = sum(p.numel() for p in params)
        results["lists"][list_name] = {"tensors": len(params), "params": numel}
        for optimizer in optimizers:
            moved = BYTES_PER_ELEMENT[optimizer] * numel
            mechgpu_ms = None
            for implementation in IMPLEMENTATIONS[optimizer]:
                if implementation == "torch compile" and not with_compile:
                    continue
                timing = time_step(optimizer, implementation, params, quick=quick,
                                   graph=len(params) > GRAPH_MIN_TENSORS)
                if implementation == "torch compile":
                    torch._dynamo.reset()  # drop the compiled step and what it holds on to
                common.free_memory()  # this optimizer's state is gone before the next one allocates
                row = {"list": list_name, "optimizer": optimizer, "implementation": implementation,
                       "bytes": moved, **timing, "gbps": None, "copy_fraction": None, "mechgpu_speedup": None}
                ms = timing["graph_ms"] or timing["ms"]  # the kernels' time where a graph was replayed
                if ms is not None:
                    row["gbps"] = common.gbps(moved, ms)
                    row["copy_fraction"] = row["gbps"] / copy["gbps"]
                    if implementation == "mechgpu":
                        mechgpu_ms = ms
                    else:
                        row["mechgpu_speedup"] = ms / mechgpu_ms
                results["rows"].append(row)
                outcome = (f"{timing['ms']:.3f} ms, host {timing['host_ms']:.3f} ms"
                           + (f", graph {timing['graph_ms']:.3f} ms" if timing["graph_ms"] else "")
                           if ms is not None else timing["error"])
                print(f"{list_name} {optimizer} {implementation}: {outcome}", flush=True)
        del params
        common.free_memory()
    return results


def to_markdown(results: dict) -> str:
    """The results as a markdown report: what was measured, then one table row per result."""
    per_element = ", ".join(f"{name} {b} B" for name, b in results["bytes_per_element"].items())
    hyper = "; ".join(f"{name} " + ", ".join(f"{k}={v}" for k, v in kwargs.items())
                      for name, kwargs in results["hyperparameters"].items() if kwargs)
    head = common.report_head(results, "mechgpu.optim vs torch.optim: one optimizer step, fp32 params",
                              f" of one full `opt.step()`, after {results['warmup_steps']} untimed steps", [
        f"- MB moved: the least a step must read and write, bytes per element × elements ({per_element})",
        f"- hyperparameters: torch's defaults, except {hyper}",
        "- host ms: median time until one `step()` call returns, the device idle before it "
        "(its kernels not waited for)",
        f"- graph ms (lists of over {GRAPH_MIN_TENSORS:,} tensors): median device time of a CUDA-graph replay of "
        "the step (torch's optimizers with `capturable=True`); GB/s, fraction and speedup use it where given",
        "- mechgpu speedup: the torch implementation's ms / mechgpu's ms",
    ])

    header = ["list", "optimizer", "implementation", "ms", "host ms", "graph ms", "MB moved", "GB/s", "of copy BW",
              "mechgpu speedup"]
    rows, errors = [], []
    for r in results["rows"]:
        ms = common.cell(r["ms"], ".3f")
        if r["error"] is not None:
            ms = "failed"
            errors.append(f"- {r['list']} {r['optimizer']} {r['implementation']}: {r['error']}")
        if r.get("graph_error"):
            errors.append(f"- {r['list']} {r['optimizer']} {r['implementation']}, graph capture: {r['graph_error']}")
        speedup = "–" if r["mechgpu_speedup"] is None else f"{r['mechgpu_speedup']:.2f}x"
        rows.append([r["list"], r["optimizer"], r["implementation"], ms, common.cell(r.get("host_ms"), ".3f"),
                     common.cell(r.get("graph_ms"), ".3f"), f"{r['bytes'] / 1e6:,.4g}",
                     common.cell(r["gbps"], ",.1f"), common.cell(r["copy_fraction"], ".0%"), speedup])
    table = common.markdown_table(header, rows, text_columns=3)
    failures = ["", "Failures:", *errors] if errors else []
    return "\n".join(head + [table] + failures)


def main(argv: list[str] | None = None) -> None:
    parser, which = common.bench_parser(__doc__, f"tiny run on {', '.join(SMOKE_LISTS)} timed with time.perf_counter, "
                                          "no torch.compile")
    which.add_argument("--lists", nargs="+", choices=list(PARAM_LISTS), help="default: all")
    parser.add_argument("--optimizers", nargs="+", choices=list(IMPLEMENTATIONS),
                        default=list(IMPLEMENTATIONS), help="default: all")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = common.parse_bench_args(parser, argv)
    lists = SMOKE_LISTS if args.smoke else {name: PARAM_LISTS[name] for name in args.lists or PARAM_LISTS}
    results = run(lists, args.optimizers, with_compile=not (args.smoke or args.no_compile), quick=args.smoke)
    common.publish(args.out, "optim", results, to_markdown(results))


if __name__ == "__main__":
    main()
