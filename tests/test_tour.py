"""``mechgpu tour``, the main job behind ``python3 run.py``: it trains with accumulation and a
memory-budget checkpoint plan, learns, and reproduces torch's loss trajectory."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import long

from mechgpu._text import parse_bytes
from mechgpu.tools.tour import final_loss, unigram_entropy

ROOT = Path(__file__).resolve().parents[1]


@long
def test_tour_learns_with_a_budget_plan_and_matches_torch():
    """The main job as a newcomer runs it on CPU (its defaults, 2 to 5 minutes on 2 cores)."""
    out = subprocess.run([sys.executable, "-m", "mechgpu", "tour", "--no-progress"], cwd=ROOT, env=dict(os.environ),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    # run, backend, checkpoint, saved predicted, saved measured, ms/step, tokens/s
    rows = [re.split(r"\s{2,}", line) for line in text.splitlines() if line.startswith(("mechgpu, ", "torch, "))]
    assert [len(r) for r in rows] == [7, 7, 7], text
    none, planned, reference = rows
    assert none[0] == "mechgpu, no checkpointing" and planned[0].startswith("mechgpu, budget"), text
    assert reference[0].startswith("torch, budget"), text
    assert [r[1] for r in rows] == ["triton interpreter (CPU)", "triton interpreter (CPU)", "torch CPU"], text
    # the plan checkpoints some blocks; predicted and measured saved bytes agree, below none's
    assert none[2] == "none" and planned[2].startswith("blocks ") and planned[2] == reference[2], text
    assert none[3] == none[4] and planned[3] == planned[4] and planned[3] != none[3], text
    # the budget bounds what forward saves, not the backward peak
    plan = re.search(r"the plan for a budget of (.+?) on what one micro-batch's forward saves for backward: .*"
                     r"predicted saved activations (.+?), within the budget; backward peak (.+?), those plus", text)
    assert plan and parse_bytes(plan[2]) <= parse_bytes(plan[1]), text
    worst = float(re.search(r"largest loss difference, mechgpu against torch over 40 steps: (\S+)", text).group(1))
    assert worst < 1e-3, text  # fp32 rounding of two op orders, compounded over 40 steps (6.0e-5 here)
    first, last = map(float, re.search(r"mechgpu's loss (\S+) -> (\S+) \(mean of the last 5 steps; "
                                       r"torch's \S+\) in 40 steps", text).groups())
    # the mean of the last 5 losses, 2.737 here, against 3.096 for character frequencies
    assert last < unigram_entropy() - 0.2 < first, text


def test_final_loss_is_the_mean_of_the_last_steps():
    assert final_loss([9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]) == 3.0
    assert final_loss([4.0, 2.0]) == 3.0 and math.isnan(final_loss([]))
