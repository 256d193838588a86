"""``mechgpu tour``, the main job behind ``python3 run.py``: it trains with accumulation and a
memory-budget checkpoint plan, learns, and reproduces torch's loss trajectory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mechgpu.tools.tour import unigram_entropy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run  # noqa: E402


def test_run_py_main_job_is_the_tour(monkeypatch):
    """``python3 run.py`` with no arguments runs ``mechgpu tour`` in its environment."""
    ran = []
    monkeypatch.setattr(run, "setup", lambda: "venv-python")
    monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert run.main([]) == 0
    assert ran == [["venv-python", "-m", "mechgpu", "tour"]]


def test_tour_learns_with_a_budget_plan_and_matches_torch():
    """The main job as a newcomer runs it on CPU (its defaults, about 2 minutes on 2 cores)."""
    out = subprocess.run([sys.executable, "-m", "mechgpu", "tour", "--no-progress"], cwd=ROOT, env=dict(os.environ),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    rows = {line.split("  ")[0]: line for line in text.splitlines()
            if line.startswith(("mechgpu, ", "torch, "))}
    assert len(rows) == 3, text
    none = next(v for k, v in rows.items() if "no checkpointing" in k)
    planned = next(v for k, v in rows.items() if k.startswith("mechgpu, budget"))
    reference = next(v for k, v in rows.items() if k.startswith("torch, budget"))
    assert "triton interpreter (CPU)" in none and "triton interpreter (CPU)" in planned and "torch CPU" in reference
    # the plan checkpoints some blocks but not all; predicted and measured saved bytes agree, below none's
    sizes = lambda row: re.findall(r"(\d+\.\d+ (?:KiB|MiB|GiB)|\d+ B)", row)
    assert "blocks " in planned and sizes(planned)[0] == sizes(planned)[1]
    assert sizes(none)[0] == sizes(none)[1] and sizes(planned)[0] != sizes(none)[0]
    worst = float(re.search(r"largest loss difference, mechgpu against torch over 40 steps: (\S+)", text).group(1))
    assert worst < 1e-3, text  # fp32 rounding of two op orders, compounded over 40 steps (5e-5 here)
    first, last = map(float, re.search(r"mechgpu's loss (\S+) -> (\S+) in 40 steps", text).groups())
    assert last < unigram_entropy() - 0.3 < first, text
