"""Every benchmark script with a --smoke mode runs end to end and writes its results.

The scripts are found by looking for a ``--smoke`` option in ``bench/*.py``, so a new
benchmark is covered as soon as it has one. Each runs in a subprocess (the scripts decide
on TRITON_INTERPRET themselves, before importing triton) with ``--smoke --out <tmp>``;
on a CPU-only machine its kernels run in Triton's interpreter, in a few seconds.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SMOKE_SCRIPTS = sorted(p for p in BENCH.glob("*.py")
                       if not p.name.startswith("_") and '"--smoke"' in p.read_text())
TIMEOUT_S = 300  # each takes seconds; this only stops a hang


def test_known_benchmarks_have_smoke_runs():
    assert {"optim.py", "clip.py", "mixed_precision.py", "activations.py", "init.py"} <= {p.name for p in SMOKE_SCRIPTS}


@pytest.mark.parametrize("script", SMOKE_SCRIPTS, ids=lambda p: p.stem)
def test_smoke_run_writes_results(script, tmp_path):
    out = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
                         cwd=BENCH.parent, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, f"{script.name} --smoke failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    json_files = list(tmp_path.glob(f"*-{script.stem}.json"))
    md_files = list(tmp_path.glob(f"*-{script.stem}.md"))
    assert len(json_files) == 1 and len(md_files) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert json_files[0].with_suffix(".md") == md_files[0]
    results = json.loads(json_files[0].read_text())
    assert results["rows"], f"{json_files[0].name} has no rows"
    assert md_files[0].read_text().count("\n|") >= 1 + len(results["rows"]), "markdown has no results table"
