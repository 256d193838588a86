"""``mechgpu tour``, the main job (``python3 run.py``): what mechgpu is for, in one run.

The character GPT of ``mechgpu train`` is trained three ways, from the same seed:

1. **mechgpu, no checkpointing**, for a few steps: the baseline of memory and speed, and
   the blocks' profile (saved bytes and forward time of each);
2. **mechgpu with a memory-budget checkpoint plan** and gradient accumulation, for the
   whole run: the budget lies halfway between checkpointing nothing and checkpointing every
   block, so the planner must choose which blocks to recompute;
3. **torch**, ``torch.optim.AdamW`` with ``torch.nn.GELU`` and torch's clip, under the same
   budget: the loss trajectory mechgpu must reproduce.

It ends with a table (checkpoint plan, saved activations predicted and measured, step
time, tokens/s, and the backend each run used), the two loss trajectories with their
largest difference, and where the run landed: the mean of its last 5 losses, as one step's
loss is noisy. On CPU mechgpu's kernels run in triton's interpreter while torch runs
natively, so speed compares only within a backend; on a GPU the same command runs
everything at full speed.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

from .._text import format_bytes
from ..train.checkpointing import predict
from .jobs import TrainConfig, build

#: steps of the short no-checkpointing run (the first is left out of its timing)
BASELINE_STEPS = 4
#: steps of the tour, by device: enough for the loss to fall well below the unigram entropy
TOUR_STEPS = {"cpu": 40, "cuda": 300}
#: the loss a run ends at is the mean over its last this many steps (one step's loss is noisy)
FINAL_STEPS = 5


def backend(cfg: TrainConfig) -> str:
    """What a run's kernels ran on: mechgpu's in triton's interpreter on CPU, torch's natively."""
    if cfg.device.startswith("cuda"):
        import torch

        return f"CUDA {torch.cuda.get_device_name(cfg.device)}"
    return "torch CPU" if cfg.torch_baseline else "triton interpreter (CPU)"


def _run(cfg: TrainConfig, steps: int, label: str) -> dict[str, Any]:
    start = time.perf_counter()
    trainer, data, _ = build(cfg)
    summary = trainer.fit(data, steps)
    return {"label": label, "backend": backend(cfg), "summary": summary, "plan": trainer.plan,
            "losses": [r["loss"] for r in trainer.history], "wall_s": time.perf_counter() - start}


def halfway_budget(profile) -> int:
    """Saved bytes halfway between checkpointing nothing and checkpointing every block."""
    n = len(profile.a)
    nothing = predict(profile, [])[0]
    everything = predict(profile, [(i, i + 1) for i in range(n)])[0]
    return (nothing + everything) // 2


def run_tour(cfg: TrainConfig) -> dict[str, Any]:
    """The three runs, their table and their loss trajectories; returns what it printed, as data."""
    if cfg.steps is None:
        cfg.steps = TOUR_STEPS["cuda" if cfg.device.startswith("cuda") else "cpu"]
    cfg.resolve()
    cfg.checkpoint = "none"
    print(f"mechgpu tour: a character GPT ({cfg.depth} blocks of width {cfg.dim}, context {cfg.context}) "
          f"on stdlib source, {cfg.steps} steps of {cfg.accum_steps} micro-batches of {cfg.micro_batch} "
          f"sequences, trained with mechgpu's AdamW (clipping fused into the step) and GELU\n")
    none = _run(copy.copy(cfg), min(BASELINE_STEPS, cfg.steps), "mechgpu, no checkpointing")
    budget = halfway_budget(none["plan"].profile)
    planned_cfg = copy.copy(cfg)
    planned_cfg.checkpoint = str(budget)
    planned = _run(planned_cfg, cfg.steps, f"mechgpu, budget {format_bytes(budget)}")
    torch_cfg = copy.copy(planned_cfg)
    torch_cfg.torch_baseline = True
    reference = _run(torch_cfg, cfg.steps, f"torch, budget {format_bytes(budget)}")

    runs = [none, planned, reference]
    print()
    print(_table(runs))
    if {r["backend"] for r in runs} != {runs[0]["backend"]}:
        print("note: on CPU mechgpu's kernels run in triton's interpreter and torch runs natively, so "
              "tokens/s compares only rows on the same backend; a GPU runs both at full speed.")
    plan = planned["plan"]
    print(f"\nthe plan for a budget of {format_bytes(budget)} on what one micro-batch's forward saves for backward: "
          f"checkpoint blocks {_blocks(plan.segments)} of {plan.n_blocks} (their forward runs again in backward); "
          f"predicted saved activations {format_bytes(plan.predicted_saved)}, within the budget; backward peak "
          f"{format_bytes(plan.predicted_peak)}, those plus the largest recomputed segment's, which the budget "
          "does not bound")
    worst = max((abs(a - b) for a, b in zip(planned["losses"], reference["losses"])), default=math.nan)
    print("\n" + _trajectories(planned["losses"], reference["losses"]))
    print(f"largest loss difference, mechgpu against torch over {len(planned['losses'])} steps: {worst:.2e}")
    first, ours, theirs = planned["losses"][0], final_loss(planned["losses"]), final_loss(reference["losses"])
    print(f"mechgpu's loss {first:.3f} -> {ours:.3f} (mean of the last {min(FINAL_STEPS, cfg.steps)} steps; "
          f"torch's {theirs:.3f}) in {cfg.steps} steps "
          f"(a model that knows only character frequencies stays near {unigram_entropy():.3f})")
    return {"runs": [{k: v for k, v in r.items() if k != "plan"} for r in runs], "budget": budget,
            "largest_loss_difference": worst, "final_loss": ours}


def final_loss(losses: list[float]) -> float:
    """Where a run landed: the mean of its last ``FINAL_STEPS`` losses, steadier than the last one alone."""
    tail = losses[-FINAL_STEPS:]
    return sum(tail) / len(tail) if tail else math.nan


def unigram_entropy() -> float:
    """The cross-entropy, in nats, of predicting each character from its frequency alone."""
    from collections import Counter

    from .gpt import CharCorpus

    counts = Counter(CharCorpus().train.tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


COLUMNS = ("run", "backend", "checkpoint", "saved predicted", "saved measured", "ms/step", "tokens/s")


def _table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for r in runs:
        s, plan = r["summary"], r["plan"]
        step_ms = f"{1e3 * s['step_s']:.0f}" if s["step_s"] else "n/a"
        tokens = f"{s['items_per_s']:,.0f}" if s["items_per_s"] else "n/a"
        rows.append((r["label"], r["backend"], f"blocks {_blocks(plan.segments)}" if plan.segments else "none",
                     format_bytes(s["predicted_saved_activation_bytes"] or 0),
                     format_bytes(s["saved_activation_bytes"] or 0), step_ms, tokens))
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(COLUMNS), line("-" * w for w in widths)] + [line(r) for r in rows])


def _blocks(segments) -> str:
    """Checkpointed segments as block ranges: "0-1, 3"."""
    return ", ".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in segments) or "none"


def _trajectories(ours: list[float], theirs: list[float], points: int = 8) -> str:
    n = min(len(ours), len(theirs))
    picks = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)}) if n > 1 else list(range(n))
    head = "step          " + "".join(f"{i + 1:>8}" for i in picks)
    return "\n".join([head, "loss mechgpu  " + "".join(f"{ours[i]:>8.4f}" for i in picks),
                      "loss torch    " + "".join(f"{theirs[i]:>8.4f}" for i in picks)])
