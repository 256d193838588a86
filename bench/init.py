"""Benchmark: initialising a 1B-parameter model, mechgpu.init against torch.nn.init.

What it measures
----------------
The model is a Llama with TinyLlama-1.1B's shapes and 20 of its 22 layers (hidden 2048,
32 query and 4 key/value heads of 64, SwiGLU MLP of 5632, vocab 32000, untied head):
1,011,959,808 parameters, of which 141 Linear weights hold 946,339,840. It is built on the
meta device and given uninitialised memory on the GPU with ``to_empty``, so building it
costs nothing and nothing is timed but initialisation. Rows:

* ``mechgpu init_model``: ``mechgpu.init.init_model(model)`` end to end: finding each
  layer's activation (a torch.fx trace), choosing the rules, building the table of fills
  and one kernel launch that fills every Linear weight (He with SiLU's gain for the MLP
  gates, Xavier for the rest);
* ``mechgpu reinit``: ``table.reinit()`` on the table init_model returned: the same fills
  with fresh values, one launch, no analysis;
* ``torch.nn.init per layer``: ``torch.nn.init.normal_(w, 0, std)`` on every weight with
  the std init_model chose: the same initialisation, one torch kernel per tensor;
* ``torch reset_parameters``: every Linear's own ``reset_parameters()`` (torch's default,
  kaiming_uniform_ with a=sqrt(5)), for reference.

Each row gives the median time of ``triton.testing.do_bench``, the launches, the bytes
the fill must write (elements x element size: a fill reads nothing), GB/s, its fraction
of the copy bandwidth measured in the same run, and mechgpu reinit's speedup over it.
Target: mechgpu at least as fast as torch.nn.init per layer, in one launch. Results go
to ``bench/results/<device>-init.json`` and ``.md``.

How to run
----------
    python bench/init.py                     # fp32; needs CUDA and ~4.5 GB
    python bench/init.py --dtype bfloat16
    python bench/init.py --smoke             # a tiny model, works on a CPU-only machine
"""

from __future__ import annotations

from dataclasses import dataclass

import _common as common
import torch
from torch import nn
from torch.nn import functional as F

import mechgpu.init


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    kv: int
    ffn: int
    heads: int
    vocab: int
    layers: int


ONE_B = LlamaShape(hidden=2048, kv=256, ffn=5632, heads=32, vocab=32000, layers=20)
SMOKE = LlamaShape(hidden=32, kv=8, ffn=64, heads=4, vocab=64, layers=2)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Block(nn.Module):
    """Pre-norm attention (grouped-query) and SwiGLU MLP, without biases."""

    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        d = s.hidden
        self.heads, self.kv_heads = s.heads, s.kv // (d // s.heads)
        self.attn_norm = nn.RMSNorm(d)
        self.q, self.k = nn.Linear(d, d, bias=False), nn.Linear(d, s.kv, bias=False)
        self.v, self.o = nn.Linear(d, s.kv, bias=False), nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.gate, self.up = nn.Linear(d, s.ffn, bias=False), nn.Linear(d, s.ffn, bias=False)
        self.down = nn.Linear(s.ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.size(0), x.size(1)
        h = self.attn_norm(x)
        q = self.q(h).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv_heads, -1).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.norm = nn.RMSNorm(s.hidden)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build(shape: LlamaShape, device: torch.device, dtype: torch.dtype) -> Llama:
    """The model with uninitialised memory on ``device``: built on meta, then ``to_empty``."""
    with torch.device("meta"):
        model = Llama(shape).to(dtype)
    return model.to_empty(device=device)


def run(shape: LlamaShape, dtype: torch.dtype, *, quick: bool) -> dict:
    """Time every row; returns the results as written to JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = common.run_header("init", device, quick=quick)
    copy = header["copy"]
    model = build(shape, device, dtype)
    table = mechgpu.init.init_model(model)  # the first call compiles the kernel
    common.synchronize()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = [(m.weight, row.std) for m, row in zip(linears, table)]
    numel = sum(w.numel() for w, _ in weights)
    moved = numel * torch.empty((), dtype=dtype).element_size()

    def torch_per_layer() -> None:
        for w, std in weights:
            nn.init.normal_(w, 0.0, std)

    def torch_reset() -> None:
        for m in linears:
            m.reset_parameters()

    implementations = [
        ("mechgpu init_model", table.launches, lambda: mechgpu.init.init_model(model)),
        ("mechgpu reinit", table.launches, table.reinit),
        ("torch.nn.init per layer", len(weights), torch_per_layer),
        ("torch reset_parameters", len(linears), torch_reset),
    ]
    results = {
        **header,
        "dtype": str(dtype).removeprefix("torch."),
        "model": {**shape.__dict__, "params": sum(p.numel() for p in model.parameters()),
                  "initialised_tensors": len(weights), "initialised_params": numel},
        "choices": sorted({f"{r.rule} before {r.activation}, gain {r.gain:.4f}" for r in table}),
        "bytes": moved,
        "rows": [],
    }
    for name, launches, fn in implementations:
        fn()  # warm up: compilation and allocator
        common.synchronize()
        ms = common.median_ms(fn, quick=quick)
        results["rows"].append({"implementation": name, "launches": launches, "ms": ms,
                                "gbps": common.gbps(moved, ms), "copy_fraction": common.gbps(moved, ms) / copy["gbps"]})
        print(f"{name}: {ms:.3f} ms", flush=True)
    reinit_ms = next(r["ms"] for r in results["rows"] if r["implementation"] == "mechgpu reinit")
    for row in results["rows"]:
        row["reinit_speedup"] = row["ms"] / reinit_ms
    return results


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}"


def to_markdown(results: dict) -> str:
    """The results as a markdown report: what was measured, then one row per implementation."""
    model = results["model"]
    head = common.report_head(
        results, f"Initialising a {_count(model['params'])}-parameter Llama: mechgpu.init vs torch.nn.init "
        f"({results['dtype']})", ", after one untimed call", [
            f"- model: hidden {model['hidden']}, {model['layers']} layers, ffn {model['ffn']}, vocab "
            f"{model['vocab']}; {model['params']:,} params, of which {model['initialised_tensors']} Linear "
            f"weights ({model['initialised_params']:,} params) are initialised",
            f"- init_model's choices: {'; '.join(results['choices'])}",
            f"- MB written: elements x element size, {results['bytes'] / 1e6:,.1f} MB (a fill reads nothing)",
            "- reinit speedup: the row's ms / mechgpu reinit's ms",
        ])
    header = ["implementation", "launches", "ms", "GB/s", "of copy BW", "reinit speedup"]
    rows = [[r["implementation"], str(r["launches"]), f"{r['ms']:.3f}", f"{r['gbps']:,.1f}",
             f"{r['copy_fraction']:.0%}", f"{r['reinit_speedup']:.2f}x"] for r in results["rows"]]
    return "\n".join(head + [common.markdown_table(header, rows, text_columns=1)])


def main(argv: list[str] | None = None) -> None:
    parser, _ = common.bench_parser(__doc__, "a tiny model timed with time.perf_counter")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = common.parse_bench_args(parser, argv)
    results = run(SMOKE if args.smoke else ONE_B, DTYPES[args.dtype], quick=args.smoke)
    common.publish(args.out, "init" if args.dtype == "float32" else f"init-{args.dtype}", results, to_markdown(results))


if __name__ == "__main__":
    main()
