"""`mechgpu bench` runs the whole suite in one call, merges its results and draws its plots;
the README's results section is exactly what the committed results give.

Without a GPU, `mechgpu bench --quick` runs every script's ``--smoke`` form (kernels in
Triton's interpreter), which is what CI exercises here.
"""

import argparse
import json
import re
import subprocess
import sys

import pytest
from conftest import HAS_CUDA, long

from mechgpu import traffic
from mechgpu.tools import bench

# The suite's CPU form (--smoke, into cpu.json) is what these check; on a GPU host
# `mechgpu bench --quick` would run the real benchmarks for minutes instead.
cpu_host = pytest.mark.skipif(HAS_CUDA, reason="checks the CPU smoke run; on a GPU host `mechgpu bench` runs "
                                               "the real benchmarks, for minutes: run it on its own")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 900  # the six smoke runs take about three minutes on two cores; this only stops a hang


def test_suite_covers_every_benchmark_script():
    # every script with a --smoke run (its own, or _common.bench_parser's)
    scripts = {p.stem for p in bench.BENCH_DIR.glob("*.py") if not p.name.startswith("_")
               and ('"--smoke"' in p.read_text() or "common.bench_parser(" in p.read_text())}
    assert {"optim", "clip", "mixed_precision", "activations", "init", "train"} <= scripts
    assert {s.name for s in bench.SUITE} | set(bench.STANDALONE) == scripts
    assert not {s.name for s in bench.SUITE} & set(bench.STANDALONE)


def test_timing_options_reach_exactly_the_scripts_that_take_them():
    """`mechgpu bench --warmup-ms/--rep-ms` passes them to the scripts marked timed, and only those accept them."""
    for script in bench.SUITE:
        usage = subprocess.run([sys.executable, str(bench.BENCH_DIR / f"{script.name}.py"), "--help"],
                               capture_output=True, text=True, timeout=300).stdout
        assert ("--warmup-ms" in usage and "--rep-ms" in usage) == script.timed, script.name


def test_step_overhead_smoke(tmp_path):
    """bench/step_overhead.py, which runs outside the suite, in its --smoke form."""
    script = bench.BENCH_DIR / "step_overhead.py"
    out = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--label", "smoke"],
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stdout + out.stderr
    (result,) = tmp_path.glob("step-overhead-*-smoke.json")
    rows = json.loads(result.read_text())["rows"]
    ours = [r for r in rows if r["implementation"].startswith("mechgpu")]
    # the step prologue and the update, plus the norm with clipping
    assert ours and all(r["launches_per_step"] == [3 if "clip" in r["case"] else 2] for r in ours), ours


def test_host_overhead_smoke():
    """bench/host_overhead.py, which runs outside the suite, in its --smoke form: its JSON rows."""
    out = subprocess.run([sys.executable, str(bench.BENCH_DIR / "host_overhead.py"), "--smoke", "--json", "-"],
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads(out.stdout)
    assert [r["case"] for r in rows] == ["AdamW", "AdamW + clip"], rows
    times = ("mechgpu_us", "torch_fused_us", "torch_foreach_us", "mechgpu_with_launch_us")
    for row in rows:
        assert {"list", "tensors", *times} <= set(row) and row["tensors"] == 148
        assert all(row[k] > 0 for k in times), row
        assert set(row["phases_us"]) == {"confirm", "uploads", "launch", "norm"}, row
    # the clipped step's norm reads the confirmed caches once they exist (in the compile-only child)
    assert rows[0]["phases_us"]["norm"] == 0 < rows[1]["phases_us"]["norm"], rows


def test_readme_results_section_is_generated_from_committed_results():
    text = bench.README.read_text()
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    section = bench.BEGIN + text.split(bench.BEGIN, 1)[1].split(bench.END, 1)[0] + bench.END
    assert section == bench.render_results(bench.RESULTS_DIR), "run `mechgpu bench --readme`"


def test_readme_why_section_quotes_the_byte_model():
    """The bytes that "Why mechgpu" compares come from mechgpu.traffic, not from a hand."""
    why = re.search(r"^## Why mechgpu\n(.*?)^## ", bench.README.read_text(), re.S | re.M)
    assert why, "README.md has no '## Why mechgpu' section"
    rows = {t.operation: t for t in traffic.TABLE}
    plain, clip = rows["AdamW step"], rows["AdamW + clip to max norm"]
    text = " ".join(why.group(1).split())
    assert f"moves {plain.torch_fused:g} B per parameter there and {plain.mechgpu:g} B here" in text
    assert f"torch {clip.torch_fused:g} B" in text and f"mechgpu {clip.mechgpu:g} B" in text
    assert f"moves {100 * (1 - clip.mechgpu / clip.torch_fused):.0f}% fewer bytes" in text


def test_committed_results_are_real_runs_and_their_files_exist():
    for run in bench.committed_runs(bench.RESULTS_DIR, include_smoke=True):
        assert not run["smoke"] and run["device"] != "cpu", f"{run['path']} is a CPU smoke run"
    section = bench.render_results(bench.RESULTS_DIR)
    for link in [part.split(")")[0] for part in section.split("](")[1:]]:
        assert (bench.ROOT / link).exists(), link


# the tests that read the one quick run stay on one xdist worker (a module fixture runs once per
# worker that needs it), and start first (long)
reads_quick_run = pytest.mark.xdist_group("bench-quick-run")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "mechgpu", "bench", "--quick", "--out", str(out)],
                          cwd=bench.ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


@long
@reads_quick_run
@cpu_host
def test_quick_run_writes_merged_results_markdown_and_plots(quick_run):
    merged = json.loads((quick_run / "cpu.json").read_text())
    assert merged["smoke"] and merged["device"] == "cpu" and not merged["failed"]
    assert set(merged["benchmarks"]) == {s.name for s in bench.SUITE}
    for name, result in merged["benchmarks"].items():
        assert result["rows"], f"{name} has no rows"
        assert result["torch"] and result["triton"] and result["date"]
    markdown = (quick_run / "cpu.md").read_text()
    for s in bench.SUITE:
        assert f"\n## {s.name}\n" in markdown
    assert markdown.count("\n|") >= sum(len(r["rows"]) for r in merged["benchmarks"].values())
    data = (quick_run / "cpu-train.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not (quick_run / "cpu-bandwidth.png").exists()  # bench.NO_CPU_BANDWIDTH_CHART


@long
@reads_quick_run
@cpu_host
def test_bandwidth_summary_has_every_kernel_family_against_torch(quick_run):
    merged = json.loads((quick_run / "cpu.json").read_text())
    rows = bench.bandwidth_rows(merged)
    kernels = " ".join(r["kernel"] for r in rows)
    for family in ("Adam step", "AdamW step", "SGD step", "RMSprop step", "AdamW + clip", "AdamW bf16",
                   "relu bf16 forward", "gelu fp32 backward", "init"):
        assert family in kernels, family
    for r in rows:
        assert r["mechgpu"] > 0 and r["mechgpu_gbps"] > 0
        if r["torch"] is not None:
            assert r["torch"] > 0 and r["speedup"] > 0
    assert sum(r["torch"] is not None for r in rows) >= len(rows) - 5  # only bf16/fp16 modes lack a torch twin


@long
@reads_quick_run
@cpu_host
def test_readme_section_shows_a_run_only_with_its_provenance(quick_run):
    hidden = bench.render_results(quick_run)
    assert "No GPU run is committed yet" in hidden and "cpu-bandwidth.png" not in hidden
    shown = bench.render_results(quick_run, include_smoke=True)
    assert "#### cpu, torch " in shown and "smoke run on CPU" in shown
    assert "cpu-bandwidth.png" not in shown and "cpu-train.png" in shown


def merged_init_run(smoke: bool) -> dict:
    """A merged result with one bandwidth row: the init benchmark, torch far above copy bandwidth."""
    rows = [{"implementation": "mechgpu reinit", "copy_fraction": 0.001, "gbps": 0.02, "ms": 9.0},
            {"implementation": "torch.nn.init per layer", "copy_fraction": 36.0, "gbps": 700.0, "ms": 0.01}]
    return {"device": "cpu" if smoke else "NVIDIA H100", "torch": "2", "triton": "3", "date": "2025-01-01",
            "smoke": smoke, "quick": True, "copy": None, "benchmarks": {"init": {"rows": rows}}, "reports": {}}


@pytest.mark.parametrize("smoke", [True, False])
def test_a_cpu_smoke_run_draws_no_bandwidth_chart_and_says_why(smoke, tmp_path, capsys):
    paths = bench.write(merged_init_run(smoke), tmp_path)
    charts = [p for p in paths if p.name.endswith("-bandwidth.png")]
    said = [line for line in capsys.readouterr().out.splitlines() if line == bench.NO_CPU_BANDWIDTH_CHART]
    assert (len(charts), len(said)) == ((0, 1) if smoke else (1, 0)), (paths, said)
    assert list(tmp_path.glob("*-bandwidth.png")) == charts


@cpu_host
def test_a_failing_script_fails_the_run(tmp_path, monkeypatch):
    scripts = tmp_path / "bench"
    scripts.mkdir()
    (scripts / "optim.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(bench, "BENCH_DIR", scripts)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--quick", "--only", "optim", "--out", str(tmp_path / "out")])
    assert bench.run(args) == 1
    assert json.loads((tmp_path / "out" / "cpu.json").read_text())["failed"] == {"optim": 3}
