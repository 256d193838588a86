"""bench/device_session.py, the one call a lent GPU gets: its plan fits the budget, it drops and
kills what would not fit, records every step, and its whole CPU form (--cpu-smoke) runs here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import HAS_CUDA, long

from mechgpu.tools import bench

sys.path.insert(0, str(bench.BENCH_DIR))
import device_session as ds  # noqa: E402

SMOKE_TIMEOUT_S = 900  # the smoke session took 207 s on two busy cores; this only stops a hang


def test_dry_run_plans_every_step_within_the_default_budget():
    out = subprocess.run([sys.executable, str(bench.BENCH_DIR / "device_session.py"), "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    total, budget = map(float, re.search(r"planned total: (\d+) s of (\d+) s", out.stdout).groups())
    assert budget == ds.DEFAULT_BUDGET_S
    # the steps, the merge after them and ~40 s of start (imports, the plan, the archive) fit in one device call
    assert ds.DEFAULT_BUDGET_S + ds.MERGE_S + 40 <= ds.DEVICE_CALL_S == 600
    assert total == sum(step.estimate_s for step in ds.STEPS) <= budget
    assert "dropped" not in out.stdout
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ") and " s " in line
              and "basis:" not in line]
    assert listed == [step.name for step in ds.STEPS]
    assert set(ds.ESTIMATES_BASIS) == {step.name for step in ds.STEPS}


def _step(name: str, estimate_s: float, run=None) -> ds.Step:
    return ds.Step(name, estimate_s, f"fake {name}", run or (lambda s, deadline: {"status": "ok"}))


def test_plan_keeps_the_steps_whose_estimates_fit_in_what_is_left():
    steps = (_step("a", 30), _step("b", 50), _step("c", 40), _step("d", 20))
    assert [fits for _, fits in ds.plan(steps, 100)] == [True, True, False, True]
    assert [fits for _, fits in ds.plan(steps, 29)] == [False, False, False, True]


def _session(tmp_path: Path, budget_s: float) -> ds.Session:
    return ds.Session(out=tmp_path, smoke=False, budget_s=budget_s, warmup_ms=1, rep_ms=1, device="cpu",
                      archive=tmp_path.parent / f"{tmp_path.name}.tgz")


def test_run_steps_skips_kills_and_records_every_step(tmp_path):
    def sleeper(s: ds.Session, deadline: float) -> dict:
        s.sh("sleeper", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
             deadline=time.monotonic() + 1.0)
        return {"status": "ok"}

    def broken(s, deadline):
        raise ValueError("no such thing")

    steps = (_step("first", 0.01), _step("too-long", 10_000), _step("broken", 0.01, broken),
             _step("sleeper", 0.01, sleeper), _step("last", 0.01))
    s = _session(tmp_path, budget_s=60)
    start = time.monotonic()
    ds.run_steps(s, steps)
    assert time.monotonic() - start < 30, "the sleeping command was not killed at its deadline"
    status = {r["step"]: r["status"] for r in s.results}
    assert status == {"first": "ok", "too-long": "skipped: its estimate, 10000 s, is over the 60 s left",
                      "broken": "failed", "sleeper": "killed: out of time", "last": "ok"}
    assert next(r for r in s.results if r["step"] == "broken")["error"] == "ValueError: no such thing"
    assert "started" in (tmp_path / "cpu-session" / "sleeper.log").read_text()
    doc = json.loads((tmp_path / "cpu-session.json").read_text())
    assert [r["step"] for r in doc["steps"]] == [step.name for step in steps]
    with tarfile.open(s.archive) as tar:
        assert {"cpu-session.json", "cpu-session.md", "cpu-session/sleeper.log"} <= set(tar.getnames())
    table = (tmp_path / "cpu-session.md").read_text()
    assert "| too-long | skipped: its estimate" in table and "| broken | failed | ValueError: no such thing" in table


def test_a_failed_preflight_stops_the_session(tmp_path):
    steps = (_step("preflight", 0.01, lambda s, d: {"status": "failed", "error": "pip install -e . exited 1"}),
             _step("gpu-tests", 0.01))
    s = _session(tmp_path, budget_s=60)
    ds.run_steps(s, steps)
    assert [r["status"] for r in s.results] == ["failed", "skipped: the preflight failed"]


def _gpu_call(tmp_path: Path, monkeypatch, run, finding: str) -> tuple[str, list[str]]:
    """The one command a bench step's ``run`` gives on a GPU (the command fails here, so the step does)."""
    s, calls = _session(tmp_path, budget_s=60), []
    monkeypatch.setattr(s, "python", lambda step, args, **kw: calls.append((step, args)) or 1)
    record = run(s, deadline=time.monotonic() + 60)
    assert record["status"] == "failed" and finding not in record
    ((step, args),) = calls
    return step, args


def test_dram_step_sizes_the_gpu_run_at_1b_with_both_modes(tmp_path, monkeypatch):
    """On a GPU the step times the 1B list, fp32 and bf16 + fp32 masters only (no GPU is needed to see the call)."""
    step, args = _gpu_call(tmp_path, monkeypatch, ds.dram_step, "dram")
    assert step == "bench-dram" and args[0].endswith("mixed_precision.py")
    assert args[args.index("--lists") + 1] == "1b"
    assert args[args.index("--modes") + 1:args.index("--modes") + 3] == ["fp32", "bf16, master weights"]
    assert "--smoke" not in args and args[args.index("--rep-ms") + 1] == "1"


def test_dram_step_records_both_modes_as_fractions_of_copy_bandwidth(tmp_path):
    """The step's CPU form (bench/mixed_precision.py --smoke in triton's interpreter): its record,
    the session's JSON and markdown carry each mode's bytes, GB/s and fraction of the same run's copy."""
    from mechgpu import traffic

    s = ds.Session(out=tmp_path, smoke=True, budget_s=600, warmup_ms=1, rep_ms=1, device="cpu")
    record = {"step": "bench-dram", "what": "dram", "estimate_s": 20, "wall_s": 1.0,
              **ds.dram_step(s, deadline=time.monotonic() + SMOKE_TIMEOUT_S)}
    assert record["status"] == "ok", _tail_log(tmp_path / "cpu-session" / "bench-dram.log")
    dram = record["dram"]
    assert dram["copy_gbps"] > 0 and dram["list"]["params"] == 3000 and dram["timing"]["method"]
    assert [r["mode"] for r in dram["rows"]] == list(ds.DRAM_MODES)
    fp32, master = dram["rows"]
    assert fp32["bytes_per_param"] == traffic.optimizer_step_bytes("AdamW") == 28
    assert master["bytes_per_param"] == traffic.optimizer_step_bytes("AdamW", 2, 4, master=True) == 30
    for r in dram["rows"]:
        assert r["bytes"] == r["bytes_per_param"] * 3000 and r["ms"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / r["ms"] / 1e6, rel=1e-12)
        assert r["copy_fraction"] == pytest.approx(r["gbps"] / dram["copy_gbps"], rel=1e-12)
    s.results.append(record)
    ds.write_summary(s)
    doc = json.loads((tmp_path / "cpu-session.json").read_text())
    assert doc["steps"][0]["dram"] == dram
    md = (tmp_path / "cpu-session.md").read_text()
    assert "## DRAM throughput of the AdamW step, without ncu" in md
    assert f"{dram['copy_gbps']:,.1f} GB/s in the same run" in md
    for r in dram["rows"]:
        assert f"| {r['mode']} | {r['bytes_per_param']} | {r['ms']:.3f} | {r['gbps']:,.1f} | " \
               f"{r['copy_fraction']:.1%} |" in md, md
    ratio = master["copy_fraction"] / fp32["copy_fraction"]
    assert f"bf16, master weights reaches {ratio:.2f}x the fp32 step's fraction of copy bandwidth." in md
    assert bench.session_findings(record) == (
        f"fp32 {fp32['gbps']:,.0f} GB/s, {fp32['copy_fraction']:.0%} of copy; bf16, master weights "
        f"{master['gbps']:,.0f} GB/s, {master['copy_fraction']:.0%} of copy (copy {dram['copy_gbps']:,.0f} GB/s)")
    assert f"| bench-dram | ok | {bench.session_findings(record)} |" in md


def test_clip_step_sizes_the_gpu_run_at_1b(tmp_path, monkeypatch):
    """On a GPU bench-clip times the 1B list, every variant (no GPU is needed to see the call)."""
    step, args = _gpu_call(tmp_path, monkeypatch, ds.clip_step, "clip")
    assert step == "bench-clip" and args[0].endswith("clip.py")
    assert args[args.index("--lists") + 1] == "1b" and "--smoke" not in args


def test_clip_step_records_each_state_precision_against_torch(tmp_path):
    """The step's CPU form (bench/clip.py --smoke in triton's interpreter): its record, the session's
    markdown, its findings and the merged bandwidth table carry fp32, bf16 and 8-bit states against
    torch's clip_grad_norm_ + fused AdamW, with bytes counted here from first principles."""
    from mechgpu.kernels.quant8 import absmax_count

    from mechgpu import traffic

    s = ds.Session(out=tmp_path, smoke=True, budget_s=600, warmup_ms=1, rep_ms=1, device="cpu")
    record = {"step": "bench-clip", "what": "clip", "estimate_s": 30, "wall_s": 1.0,
              **ds.clip_step(s, deadline=time.monotonic() + SMOKE_TIMEOUT_S)}
    assert record["status"] == "ok", _tail_log(tmp_path / "cpu-session" / "bench-clip.log")
    clip = record["clip"]
    numels = [1000, 41 * 127, 1000]  # bench/clip.py's smoke list: one tensor over MIN_8BIT_NUMEL
    assert clip["list"]["params"] == sum(numels) and clip["copy_gbps"] > 0
    fp32, bf16, q8 = clip["rows"]
    assert [r["state_dtype"] for r in clip["rows"]] == ["fp32", "bf16", "8-bit"]
    assert [r["variant"] for r in clip["rows"]] == list(ds.CLIP_VARIANTS) and clip["torch"]["variant"] == "d"
    n = sum(numels)
    # per element: g read, p read and written (3 x 4 B), the norm reads g (4 B), two states read and written
    assert fp32["bytes"] == (12 + 4 + 2 * 2 * 4) * n
    assert bf16["bytes"] == (12 + 4 + 2 * 2 * 2) * n
    big = 41 * 127  # uint8 codes and an fp32 absmax per block, the partial last block whole
    assert q8["bytes"] == pytest.approx((12 + 4) * n + 2 * 2 * (4 * 2000 + big + 4 * absmax_count(big)), rel=1e-12)
    assert clip["torch"]["bytes"] == (12 + 4 + 8 + 2 * 2 * 4) * n  # torch's clip also rescales g: 8 B more
    for r in [*clip["rows"], clip["torch"]]:
        assert r["bytes_per_param"] == pytest.approx(r["bytes"] / n, rel=1e-12) and r["ms"] > 0
        assert r["vs_torch"] == pytest.approx(clip["torch"]["ms"] / r["ms"], rel=1e-12)
        assert r["copy_fraction"] == pytest.approx(r["gbps"] / clip["copy_gbps"], rel=1e-12)
    assert traffic.state_8bit_size(big) == pytest.approx((big + 4 * absmax_count(big)) / big, rel=1e-12)
    s.results.append(record)
    ds.write_summary(s)
    md = (tmp_path / "cpu-session.md").read_text()
    assert "## AdamW + clip to max norm: fp32, bf16 and 8-bit states against torch" in md
    for r in [*clip["rows"], clip["torch"]]:
        assert f"| ({r['variant']}) {r['implementation']} | {r['state_dtype']} | {r['bytes_per_param']:.4g} | " \
               f"{r['ms']:.3f} |" in md, md
    assert "8-bit states" in bench.session_findings(record) and "x torch" in bench.session_findings(record)
    doc = json.loads((tmp_path / "cpu-session" / "bench-clip" / record["files"][0]).read_text())
    kernels = {r["kernel"]: r for r in bench.bandwidth_rows({"benchmarks": {"clip": doc}})}
    assert set(kernels) == {f"AdamW + clip{states} (1k-5k-1k)" for states in ("", ", bf16 states", ", 8-bit states")}
    assert all(r["torch_implementation"] == clip["torch"]["implementation"] for r in kernels.values())


def _tail_log(path: Path) -> str:
    return path.read_text()[-4000:] if path.exists() else f"no {path}"


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="1" errors="2" skipped="3"/></testsuites>')
    assert ds.junit_counts(xml) == {"tests": 7, "failures": 1, "errors": 2, "skipped": 3, "passed": 1}
    assert ds.junit_counts(tmp_path / "missing.xml")["tests"] == 0


@long
@pytest.mark.skipif(HAS_CUDA, reason="the CPU form of the session; on a GPU host run the session itself")
def test_cpu_smoke_session_runs_every_step(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "session.tgz"
    run = subprocess.run([sys.executable, str(bench.BENCH_DIR / "device_session.py"), "--cpu-smoke", "--out", str(out),
                          "--archive", str(archive)], capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    doc = json.loads((out / "cpu-session.json").read_text())
    steps = {r["step"]: r for r in doc["steps"]}
    assert list(steps) == [step.name for step in ds.STEPS]
    assert all(r["status"] == "ok" for r in doc["steps"]), doc["steps"]
    assert doc["smoke"] and doc["torch"] and doc["triton"]
    # the GPU tests were selected and skipped here; the checks all ran and passed
    tests = steps["gpu-tests"]
    assert tests["tests"] > 300 and tests["skipped"] == tests["tests"] and tests["failures"] == tests["errors"] == 0
    check = json.loads((out / "cpu-check.json").read_text())
    assert check["failed"] == 0 and check["checks"] == steps["check"]["checks"] > 200 and check["quick"]
    assert "without compute-sanitizer" in steps["sanitizer"]["note"]
    assert [r["mode"] for r in steps["bench-dram"]["dram"]["rows"]] == list(ds.DRAM_MODES)
    assert "## DRAM throughput of the AdamW step" in (out / "cpu-session.md").read_text()
    # the benchmarks merged as `mechgpu bench` merges them, with the session's selections
    merged = json.loads((out / "cpu.json").read_text())
    assert merged["smoke"] and merged["session"] == {"warmup_ms": ds.SESSION_WARMUP_MS, "rep_ms": ds.SESSION_REP_MS}
    assert set(merged["benchmarks"]) == set(ds.BENCH_SCRIPTS)
    activations = merged["benchmarks"]["activations"]["rows"]
    assert {(r["activation"], r["dtype"]) for r in activations} == {("relu", "bf16"), ("gelu", "bf16")}
    assert {(r["implementation"], r["checkpoint"]) for r in merged["benchmarks"]["train"]["rows"]} == {
        ("mechgpu", "none"), ("mechgpu", "sqrt")}
    optim_rows = merged["benchmarks"]["optim"]["rows"]
    keys = [(r["list"], r["optimizer"], r["implementation"]) for r in optim_rows]
    assert len(keys) == len(set(keys)) and all(r["host_ms"] > 0 for r in optim_rows)
    assert bench.bandwidth_rows(merged)
    for name in ("cpu.md", "cpu-train.png", "cpu-session.md"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "cpu-bandwidth.png").exists()  # a CPU smoke run measures no kernel's bandwidth
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"cpu-session.json", "cpu.json", "cpu-check.json", "cpu-session/gpu-tests.xml"} <= names
    # the README's results section reads it (smoke runs only when asked: never from bench/results)
    section = bench.render_results(out, include_smoke=True)
    assert f"cpu, torch {doc['torch']}" in section and f"{len(ds.STEPS)} of {len(ds.STEPS)} steps ok" in section
    assert "No device session is committed yet" in bench.render_results(out)
