"""Benchmark: training the character GPT, mechgpu (fused AdamW, GELU, checkpoint policies)
against the torch baseline (torch.optim.AdamW, torch.nn.GELU, no checkpointing).

What it measures
----------------
One run trains the ``mechgpu train`` model (``mechgpu.tools.gpt.CharGPT``; 24 blocks of
width 1024, context 512, micro-batch 16 on a GPU) under each configuration from the same
init and data, and records, per row: peak memory (``torch.cuda.max_memory_allocated``),
saved-activation bytes of one micro-batch (``saved_tensors_hooks``) and what the memory
model predicted, tokens/s with the first steps excluded, step time, final loss.
Rows: torch baseline; mechgpu with checkpoint none, sqrt, all, and budgets of 50% and 25%
of the unchekpointed saved activations.

Targets (H100): ``sqrt`` cuts activation memory at least 4x for at most 1.4x the step
time of ``none``; a budget plan lands within 10% of the budget; mechgpu ``none`` reaches
at least 1.1x the baseline's tokens/s at equal or lower peak memory. The checks are
printed with each result. Results go to ``bench/results/<device>-train.json`` and ``.md``.

How to run
----------
    python bench/train.py            # needs CUDA
    python bench/train.py --smoke    # a tiny model, a few steps, works on a CPU-only machine
    python bench/train.py --rows mechgpu-none mechgpu-sqrt --steps 12   # sqrt against none only
"""

from __future__ import annotations

import _common as common
import torch

from mechgpu._text import format_bytes
from mechgpu.tools.gpt import CharCorpus
from mechgpu.tools.jobs import TrainConfig, build

FULL = dict(dim=1024, depth=24, heads=16, context=512, micro_batch=16, accum_steps=1, steps=30, lr=3e-4)
SMOKE = dict(dim=16, depth=4, heads=2, context=8, micro_batch=2, accum_steps=1, steps=2, lr=1e-2)


# The rows, in order: (implementation, checkpoint policy). "budgetN" is N% of what mechgpu's
# "none" row saved, so it comes after that row.
ROWS = (("torch", "none"), ("mechgpu", "none"), ("mechgpu", "sqrt"), ("mechgpu", "all"),
        ("mechgpu", "budget50"), ("mechgpu", "budget25"))
ROW_NAMES = {f"{impl}-{policy}": (impl, policy) for impl, policy in ROWS}


def run(shape: dict, device: str, rows_wanted: list[str] | None = None) -> dict:
    corpus = CharCorpus()
    rows = []
    base = TrainConfig(device=device, progress=False, dropout=0.0, bf16=device == "cuda", **shape)
    wanted = [ROW_NAMES[name] for name in rows_wanted] if rows_wanted else list(ROWS)
    if any(policy.startswith("budget") for _, policy in wanted) and ("mechgpu", "none") not in wanted:
        raise ValueError("a budget row is a fraction of the mechgpu-none row's saved activations: ask for that row too")
    none_saved = None
    for impl, policy in sorted(wanted, key=ROWS.index):
        baseline = impl == "torch"
        if policy.startswith("budget"):
            policy = f"{int(none_saved * int(policy[6:]) / 100)}B"
        cfg = TrainConfig(**{**base.__dict__, "checkpoint": policy, "torch_baseline": baseline})
        common.free_memory()
        trainer, data, _ = build(cfg, corpus)
        trainer.warmup_steps = min(3, shape["steps"] - 1)
        s = trainer.fit(data, cfg.steps)
        if impl == "mechgpu" and policy == "none":
            none_saved = s["saved_activation_bytes"]
        rows.append({"implementation": impl, "checkpoint": policy, "peak_bytes": s.get("peak_bytes"),
                     "saved_bytes": s["saved_activation_bytes"],
                     "predicted_saved_bytes": s["predicted_saved_activation_bytes"],
                     "budget_bytes": trainer.plan.budget, "tokens_per_s": s["items_per_s"],
                     "step_ms": 1e3 * s["step_s"], "final_loss": s["final_loss"]})
        print(rows[-1], flush=True)
        del trainer, data
    by = {(r["implementation"], r["checkpoint"]): r for r in rows}
    none, sqrt, torch_row = by.get(("mechgpu", "none")), by.get(("mechgpu", "sqrt")), by.get(("torch", "none"))
    checks = {"budget_landing": [r["saved_bytes"] / r["budget_bytes"] for r in rows if r["budget_bytes"]]}
    if none and sqrt:
        checks["sqrt_activation_cut"] = none["saved_bytes"] / sqrt["saved_bytes"]
        checks["sqrt_step_time_ratio"] = sqrt["step_ms"] / none["step_ms"]
    if none and torch_row:
        checks["tokens_per_s_vs_torch"] = none["tokens_per_s"] / torch_row["tokens_per_s"]
        checks["peak_vs_torch"] = none["peak_bytes"] / torch_row["peak_bytes"] if none["peak_bytes"] else None
    return {**common.environment(torch.device(device)), "shape": shape, "rows": rows, "checks": checks}


def to_markdown(results: dict) -> str:
    fmt = lambda b: format_bytes(b) if b else "n/a"
    rows = [[r["implementation"], r["checkpoint"], fmt(r["peak_bytes"]), fmt(r["saved_bytes"]),
             fmt(r["predicted_saved_bytes"]), f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}",
             f"{r['final_loss']:.4f}"] for r in results["rows"]]
    table = common.markdown_table(["implementation", "checkpoint", "peak memory", "saved activations", "predicted",
                                   "tokens/s", "ms/step", "final loss"], rows, text_columns=2)
    c = results["checks"]
    notes = []
    if "sqrt_activation_cut" in c:
        notes.append(f"sqrt cuts saved activations {c['sqrt_activation_cut']:.2f}x (target >= 4) for "
                     f"{c['sqrt_step_time_ratio']:.2f}x the step time (target <= 1.4)")
    if c["budget_landing"]:
        notes.append(f"budget plans land at {', '.join(f'{x:.2f}' for x in c['budget_landing'])} of their "
                     "budgets (target within 10%)")
    if "tokens_per_s_vs_torch" in c:
        notes.append(f"mechgpu tokens/s {c['tokens_per_s_vs_torch']:.2f}x torch's (target >= 1.1)")
    return f"# train on {results['device']}\n\nshape: {results['shape']}\n\n{table}\n\n{'; '.join(notes)}\n"


def main(argv: list[str] | None = None) -> None:
    parser, _ = common.bench_parser(__doc__, "a tiny model", timed=False)
    parser.add_argument("--rows", nargs="+", choices=list(ROW_NAMES), default=None,
                        help="default: all; e.g. --rows mechgpu-none mechgpu-sqrt")
    parser.add_argument("--steps", type=int, default=None, help="training steps per row (default: the shape's)")
    args = common.parse_bench_args(parser, argv)
    shape = SMOKE if args.smoke else FULL
    if args.steps:
        shape = {**shape, "steps": args.steps}
    results = run(shape, "cuda" if torch.cuda.is_available() else "cpu", args.rows)
    common.publish(args.out, "train", results, to_markdown(results))


if __name__ == "__main__":
    main()
