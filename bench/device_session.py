"""The one call a lent GPU gets: install, GPU tests, ``mechgpu check``, compute-sanitizer and the
core benchmarks, within a time budget, with every result written as it comes.

    python bench/device_session.py --dry-run            # the plan: each step's estimate, the total
    python bench/device_session.py --out DIR [--budget 500] [--archive FILE]
    python bench/device_session.py --cpu-smoke --out DIR  # every step's plumbing on CPU (CI runs it)

On the device machine (the ``device`` tool's ``run``, with ``timeout_s`` 600), one command:

    PYTHONUNBUFFERED=1 python3 bench/device_session.py --out /tmp/session --archive $OUT/session.tgz

The steps, in order (``--dry-run`` prints them with their estimates):

1. ``preflight``: ``pip install --no-deps --no-build-isolation -e .`` (that machine has torch and
   triton but no package registry); imports from outside the checkout; versions; the GPU's name,
   SMs, memory and clocks as ``nvidia-smi`` reads them (nothing is set). If it fails, nothing else runs.
2. ``gpu-tests``: ``pytest -m gpu -x`` (over 8 pytest-xdist workers where xdist is installed).
3. ``check``: ``mechgpu check --quick --json DIR/<device>-check.json``.
4. ``sanitizer``: ``compute-sanitizer --tool memcheck`` over ``mechgpu check --quick`` on a short
   optimizer, state-mutation, clip and activation subset, with torch's caching allocator off so
   that an access past a tensor leaves its allocation.
5. the core benchmarks, with do_bench shortened to ``--warmup-ms``/``--rep-ms``: fp32 Adam,
   AdamW, SGD and RMSprop at 1B parameters against torch's best; AdamW + clip at 1B; relu and
   gelu forward and backward in bf16; sqrt checkpointing against none on the training model; and
   the many-tensor list (10,000 x 1,000; AdamW, SGD, RMSprop) timed as CUDA-graph replays, its host
   time beside it.
   Each script measures the copy bandwidth in the same run. ``bench-clip`` times AdamW + clip with
   fp32, bf16 and 8-bit states against torch's ``clip_grad_norm_`` + fused AdamW; its rows (bytes
   from ``mechgpu.traffic``, GB/s, fraction of copy, torch's time over each) go into the step's
   record (``clip``) and a table of the summary.
6. ``bench-dram``: DRAM throughput without ncu: the AdamW step at 1B parameters in fp32 and in
   bf16 with fp32 masters (``bench/mixed_precision.py --lists 1b --modes ...``), each as effective
   GB/s (``mechgpu.traffic.optimizer_step_bytes`` / the median of do_bench's CUDA-event timings,
   after its warm-up) and as a fraction of the copy bandwidth of a buffer as large as the fp32
   params, measured in the same run. The step's record and the summary's table carry both rows.
7. ``fit``: ``mechgpu fit`` unconstrained, then in a quarter of that peak.

Each step has an estimate (``Step.estimate_s``). Before a step starts, the session compares its
estimate with the budget left and skips it if it would not fit; a running step is killed at
twice its estimate plus a minute, or when the budget runs out. Skipped and killed steps are
recorded as such, never dropped silently.

What it writes in DIR (and, after every step, into ``--archive`` as one .tar.gz, since the
device tool brings back at most 8 files):

    <device>-session.json, .md   the summary: each step's status, estimate, wall time and findings
    <device>.json, .md, *.png    the merged benchmarks, as ``mechgpu bench`` writes them
    <device>-check.json          ``mechgpu check --json``
    <device>-session/            each step's log, the pytest JUnit XML, each benchmark's own files

Back here: ``tar -xzf session.tgz -C bench/results && python3 run.py mechgpu bench --readme``
puts the figures into the README's results section; commit ``bench/results/``.

``--cpu-smoke`` runs the same steps on CPU with the kernels in Triton's interpreter: the
preflight builds a wheel offline instead of installing, pytest selects the GPU tests (which
skip), the sanitizer step runs its checks without compute-sanitizer, and the benchmarks run
with ``--smoke``. Its results show that the session works, not how fast anything is.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# This process imports mechgpu.tools.bench (stdlib only) from the checkout: mechgpu may not be installed
# yet, and an install made by the preflight is seen only by new processes. What needs the installed
# package (the merged benchmarks and their plots) runs in one: ``--merge``.
sys.path.insert(0, str(ROOT))
# The device tool runs one command for at most DEVICE_CALL_S: the steps' budget, the merge after
# them (MERGE_S at most) and the start (imports, the plan) fit in it.
DEVICE_CALL_S = 600
DEFAULT_BUDGET_S = 500
MERGE_S = 60
# do_bench's warm-up and repetitions in the session (the scripts' own defaults are 100 and 1000 ms)
SESSION_WARMUP_MS = 25
SESSION_REP_MS = 200
XDIST_WORKERS = 8
# The sanitizer's subset of `mechgpu check` (case-name substrings): one optimizer of each kind,
# the state mutations (stale addresses), clip-in-step, 8-bit states (codes and per-block absmax,
# a partial last block), every clip norm, relu's mask and gelu.
SANITIZER_CASES = ("optim.Adam", "optim.SGD-nesterov", "optim.RMSprop-centered", "optim.state_mutations",
                   "optim.max_grad_norm", "optim.master_weights", "optim.state_dtype_8bit", "clip.", "act.relu",
                   "act.gelu")
# Read from nvidia-smi in the preflight; nothing is set.
GPU_QUERY = ("name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
             "power.draw,power.limit,temperature.gpu,persistence_mode,compute_mode")


# ----------------------------------------------------------------------------------
# the session: where things go, and how a command runs
# ----------------------------------------------------------------------------------
@dataclass
class Session:
    out: Path
    smoke: bool
    budget_s: float
    warmup_ms: float
    rep_ms: float
    device: str  # torch.cuda.get_device_name(), or "cpu"
    archive: Path | None = None
    start: float = field(default_factory=time.monotonic)
    results: list[dict] = field(default_factory=list)

    @property
    def slug(self) -> str:
        from mechgpu.tools.bench import device_slug

        return device_slug(self.device)

    @property
    def steps_dir(self) -> Path:
        return self.out / f"{self.slug}-session"

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.smoke:
            env["TRITON_INTERPRET"] = "1"
        return env

    def sh(self, step: str, argv: list[str], *, deadline: float, cwd: Path = ROOT,
           env: dict[str, str] | None = None) -> int:
        """Run ``argv``, its output appended to ``<steps_dir>/<step>.log``; killed with its whole
        process group (pytest-xdist workers too) at ``deadline`` (time.monotonic)."""
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        with open(self.steps_dir / f"{step}.log", "a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            print(f"  $ {' '.join(argv)}", flush=True)
            proc = subprocess.Popen(argv, cwd=cwd, env=env or self.env(), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise

    def python(self, step: str, args: list[str], **kw) -> int:
        return self.sh(step, [sys.executable, *args], **kw)


@dataclass(frozen=True)
class Step:
    name: str
    estimate_s: float  # on an H100/H200; see ESTIMATES_BASIS
    what: str
    run: Callable[[Session, float], dict]  # (session, deadline) -> findings, with "status"


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# ----------------------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------------------
PROBE = r"""
import json, os, subprocess, sys
import torch, triton
import mechgpu, mechgpu.kernels, mechgpu.optim
from mechgpu.kernels import optim
info = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
        "cuda_runtime": torch.version.cuda, "mechgpu_from": os.path.dirname(mechgpu.__file__),
        "kernels_from": os.path.dirname(optim.__file__), "cuda": torch.cuda.is_available()}
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_bytes=p.total_memory, l2_bytes=getattr(p, "L2_cache_size", None))
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=" + sys.argv[1], "--format=csv"], capture_output=True,
                           text=True, timeout=30)
        head, row = q.stdout.strip().splitlines()[:2]
        info["nvidia_smi"] = dict(zip([h.strip() for h in head.split(",")], [v.strip() for v in row.split(",")]))
    except Exception as exc:
        info["nvidia_smi"] = f"not read: {exc}"
else:
    info["device"] = "cpu"
print("PROBE " + json.dumps(info))
"""


def preflight(s: Session, deadline: float) -> dict:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory(prefix="mechgpu-preflight-") as tmp:
        if s.smoke:  # the same offline build, into a wheel, leaving this environment as it is
            rc = s.sh("preflight", [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp,
                                    str(ROOT)], deadline=deadline)
            built = [p.name for p in Path(tmp).glob("mechgpu-*.whl")]
            if rc != 0 or not built:
                return {"status": "failed", "error": f"offline wheel build exited {rc}"}
        else:
            rc = s.sh("preflight", [*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                                    str(ROOT)], deadline=deadline)
            if rc != 0:
                return {"status": "failed", "error": f"pip install -e . exited {rc}"}
        # from outside the checkout, so that the import proves the install (mechgpu.kernels is kernels/)
        rc = s.python("preflight", ["-c", PROBE, GPU_QUERY], deadline=deadline, cwd=Path(tmp))
    probe = [line for line in (s.steps_dir / "preflight.log").read_text().splitlines() if line.startswith("PROBE ")]
    if rc != 0 or not probe:
        return {"status": "failed", "error": f"the import probe exited {rc}"}
    info = json.loads(probe[-1][len("PROBE "):])
    if info["device"] != s.device:
        return {"status": "failed", "error": f"the probe saw {info['device']}, this process {s.device}", **info}
    return {"status": "ok", **info}


def gpu_tests(s: Session, deadline: float) -> dict:
    xml = s.steps_dir / "gpu-tests.xml"
    argv = ["-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    if not s.smoke and importlib.util.find_spec("xdist") is not None:
        argv += ["-n", str(XDIST_WORKERS)]
    rc = s.python("gpu-tests", argv, deadline=deadline)
    counts = junit_counts(xml)
    return {"status": "ok" if rc == 0 else "failed", "exit_code": rc, **counts}


def junit_counts(xml: Path) -> dict:
    """tests, failures, errors, skipped and passed from a pytest JUnit XML file."""
    if not xml.exists():
        return {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "passed": 0}
    root = ElementTree.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(suite.get(k, 0)) for suite in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def check(s: Session, deadline: float) -> dict:
    path = s.out / f"{s.slug}-check.json"
    rc = s.python("check", ["-m", "mechgpu", "check", "--quick", "--json", str(path)], deadline=deadline)
    if not path.exists():
        return {"status": "failed", "exit_code": rc}
    doc = json.loads(path.read_text())
    return {"status": "ok" if rc == 0 else "failed", "exit_code": rc, "checks": doc["checks"], "failed": doc["failed"],
            "file": path.name}


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    candidates = [found] if found else []
    candidates += ["/usr/local/cuda/bin/compute-sanitizer", *sorted(map(str, Path("/opt/nvidia").glob(
        "*/compute-sanitizer/compute-sanitizer")))]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def sanitizer(s: Session, deadline: float) -> dict:
    checks = ["-m", "mechgpu", "check", "--quick", *(a for case in SANITIZER_CASES for a in ("--only", case))]
    tool = None if s.smoke else find_sanitizer()
    if tool is None:  # the checks still run, so the step's plumbing is exercised
        rc = s.python("sanitizer", checks, deadline=deadline)
        status = ("ok" if rc == 0 else "failed") if s.smoke else "failed"
        return {"status": status, "exit_code": rc, "memcheck": None,
                "note": "CPU smoke: the checks ran without compute-sanitizer" if s.smoke
                else "compute-sanitizer not found; the checks ran without it"}
    env = dict(s.env(), PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    rc = s.sh("sanitizer", [tool, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "20",
                            sys.executable, *checks], deadline=deadline, env=env)
    log = (s.steps_dir / "sanitizer.log").read_text(errors="replace")
    summary = [line for line in log.splitlines() if "ERROR SUMMARY" in line]
    return {"status": "ok" if rc == 0 else "failed", "exit_code": rc, "memcheck": summary[-1] if summary else None,
            "cases": list(SANITIZER_CASES)}


def bench_step(name: str, script: str, size_args: tuple[str, ...], select_args: tuple[str, ...] = (),
               timed: bool = True) -> Callable[[Session, float], dict]:
    """A step that runs ``bench/<script>.py`` into its own folder under the steps folder: on a GPU
    with ``size_args`` and ``select_args``, in the CPU smoke run with ``--smoke`` and ``select_args``."""

    def run(s: Session, deadline: float) -> dict:
        folder = s.steps_dir / name
        args = ["--smoke"] if s.smoke else list(size_args)
        args += select_args
        if timed:
            args += ["--warmup-ms", str(s.warmup_ms), "--rep-ms", str(s.rep_ms)]
        rc = s.python(name, [str(BENCH / f"{script}.py"), *args, "--out", str(folder)], deadline=deadline)
        files = sorted(p.name for p in folder.glob(f"*-{script}.json")) if folder.exists() else []
        return {"status": "ok" if rc == 0 and files else "failed", "exit_code": rc, "script": script, "files": files}

    return run


def fit_step(s: Session, deadline: float) -> dict:
    """``mechgpu fit`` twice: with no real cap (its measured peak is the unconstrained one), then
    with a quarter of that peak as the budget; both fit.json files are kept. (The CPU smoke run's
    tiny model has little beside its static memory: its second budget is the whole peak.)"""
    found = {}
    budget, share = "1TiB", (1 if s.smoke else 4)
    for label in ("unconstrained", "quarter"):
        folder = s.steps_dir / f"fit-{label}"
        args = ["-m", "mechgpu", "fit", "--memory", budget, "--out", str(folder)]
        if s.smoke:
            args += ["--dim", "16", "--depth", "2", "--heads", "2", "--context", "8", "--global-batch", "4",
                     "--steps", "2"]
        rc = s.python("fit", args, deadline=deadline)
        path = folder / "fit.json"
        if rc != 0 or not path.exists():
            return {"status": "failed", "exit_code": rc, "at": label, **found}
        doc = json.loads(path.read_text())
        found[label] = {k: doc[k] for k in ("budget_bytes", "chosen", "predicted_peak_bytes", "measured_peak_bytes",
                                            "tokens_per_s")}
        budget = str(max(1, doc["measured_peak_bytes"] // share))
    return {"status": "ok", **found}


def _bench_result(s: Session, step: str, found: dict) -> dict:
    """The JSON a bench step (``bench_step``) wrote, from what it found."""
    return json.loads((s.steps_dir / step / found["files"][0]).read_text())


#: bench/clip.py's variants that bench-clip's record keeps: mechgpu's clip in the step with fp32, bf16 and
#: 8-bit states, and torch's clip_grad_norm_ + fused AdamW, which each is timed against
CLIP_VARIANTS, CLIP_TORCH = ("b", "f", "g"), "d"
_CLIP = bench_step("bench-clip", "clip", ("--lists", "1b"))


def clip_step(s: Session, deadline: float) -> dict:
    """``bench/clip.py`` (the 1B list on a GPU), with the state precisions' rows lifted into the record:
    ``clip`` holds, per CLIP_VARIANTS row (``rows``) and for CLIP_TORCH's (``torch``), the states, bytes,
    ms, GB/s, fraction of copy and torch's ms over the row's (``vs_torch``)."""
    found = _CLIP(s, deadline)
    if found["status"] != "ok":
        return found
    doc = _bench_result(s, "bench-clip", found)
    (list_name,) = doc["lists"]
    by = {r["variant"]: r for r in doc["rows"]}
    missing = [v for v in (*CLIP_VARIANTS, CLIP_TORCH) if v not in by]
    if missing:
        return {**found, "status": "failed", "error": f"bench/clip.py wrote no variant {', '.join(missing)}"}
    keys = ("variant", "implementation", "state_dtype", "bytes_per_param", "bytes", "ms", "gbps", "copy_fraction")
    rows = {v: {**{k: by[v][k] for k in keys}, "vs_torch": by[CLIP_TORCH]["ms"] / by[v]["ms"]}
            for v in (*CLIP_VARIANTS, CLIP_TORCH)}
    return {**found, "clip": {"list": {"name": list_name, **doc["lists"][list_name]}, "copy_gbps": doc["copy"]["gbps"],
                              "timing": doc["timing"], "rows": [rows[v] for v in CLIP_VARIANTS],
                              "torch": rows[CLIP_TORCH]}}


#: bench/mixed_precision.py's modes that bench-dram compares: the fp32 step and bf16 + fp32 masters
DRAM_MODES = ("fp32", "bf16, master weights")
_DRAM = bench_step("bench-dram", "mixed_precision", ("--lists", "1b"), ("--modes", *DRAM_MODES))


def dram_step(s: Session, deadline: float) -> dict:
    """``bench/mixed_precision.py`` on DRAM_MODES (the 1B list on a GPU), its findings lifted into
    the record: ``dram`` holds the copy bandwidth and, per mode, bytes, ms, GB/s and fraction of copy."""
    found = _DRAM(s, deadline)
    if found["status"] != "ok":
        return found
    doc = _bench_result(s, "bench-dram", found)
    rows = [{k: r[k] for k in ("mode", "bytes_per_param", "bytes", "ms", "gbps", "copy_fraction")}
            for r in doc["rows"]]
    if [r["mode"] for r in rows] != list(DRAM_MODES):
        return {**found, "status": "failed", "error": f"modes {[r['mode'] for r in rows]}, not {list(DRAM_MODES)}"}
    copy = doc["copy"]
    return {**found, "dram": {"list": doc["list"], "copy_gbps": copy["gbps"], "copy_buffer_bytes": copy["buffer_bytes"],
                              "timing": doc["timing"], "rows": rows}}


# Estimates on an H100/H200, in seconds. First figures from the work each step does; the
# first real session records every step's wall time in <device>-session.json: replace these with them.
ESTIMATES_BASIS = {
    "preflight": "an offline editable install (~10 s) and one import probe with CUDA start (~10 s)",
    "gpu-tests": "411 tests; triton compiles ~150 kernel variants at 1-2 s each, spread over 8 xdist workers",
    "check": "~245 quick checks on small tensors, most kernels already compiled by the tests; the 20 8-bit "
             "checks (optim.state_dtype_8bit) compile 4 kernel variants (~1.5 s each) and run a float64 "
             "reference step on the host",
    "sanitizer": "~80 checks under memcheck, which slows each launch 10-100x; no allocator cache; the 8-bit "
                 "states' 5 optimizers x 3 steps add ~5 s",
    "bench-optim": "4 + 4 GB of fp32 params and grads at 1B; 10 implementations x (3 warm-up steps, "
                   "0.25 s of do_bench, 20 host-timed steps) at 7-30 ms a step; a 1 GiB copy",
    "bench-clip": "7 variants at 1B, each a redraw, 3 warm-up steps and 0.25 s of do_bench (~1 s); the bf16- and "
                  "8-bit-state variants (f, g) compile their update kernels with clip (~1.5 s each): 25 s for "
                  "the 5 fp32 variants + 5 s",
    "bench-activations": "relu and gelu, bf16, 256M elements: 12 do_bench calls and the saved-bytes runs",
    "bench-train": "building the 24 x 1024 model twice and 8 bf16 steps of 16 x 512 tokens (3 warm-up, 5 timed), "
                   "none and sqrt; 12 steps before bench-clip's state precisions took 5 s of the budget",
    "bench-optim-many": "10,000 tensors: AdamW, SGD and RMSprop, 7 implementations, each eager, host-timed and a "
                        "graph capture; mechgpu's first step builds a 10,000-row table on the host. Adam (its "
                        "kernel and host path are AdamW's; bench-optim times it at 1B) left this list to pay "
                        "for bench-clip's and the checks' 8-bit additions: 40 s with it",
    "bench-dram": "a 3.8 GiB copy, then 2 modes at 1B (16 GB of params, grads and states each): 3 warm-up "
                  "steps and 0.25 s of do_bench at ~10 ms a step; the fp32 kernel compiled by bench-optim, "
                  "the bf16 + master one by the GPU tests (else ~5 s); ~8 s of imports",
    "fit": "two mechgpu fit runs of the 12 x 384 model: probes at each micro-batch size dividing 64 and "
           "3 confirming steps each",
}

STEPS = (
    Step("preflight", 25, "offline install, imports, versions, GPU name/SMs/memory/clocks", preflight),
    Step("gpu-tests", 150, "pytest -m gpu -x", gpu_tests),
    Step("check", 50, "mechgpu check --quick --json", check),
    Step("sanitizer", 60, "compute-sanitizer memcheck over optimizer, state-mutation, 8-bit-state, clip and "
         "activation checks", sanitizer),
    Step("bench-optim", 45, "Adam, AdamW, SGD, RMSprop at 1B fp32 against torch fused and foreach",
         bench_step("bench-optim", "optim", ("--lists", "1b"), ("--no-compile",))),
    Step("bench-clip", 30, "AdamW + clip at 1B: fused, separate, torch; fp32, bf16 and 8-bit states",
         clip_step),
    Step("bench-activations", 25, "relu and gelu, bf16, forward and backward, 256M elements",
         bench_step("bench-activations", "activations", ("--sizes", "256M"),
                    ("--activations", "relu", "gelu", "--dtypes", "bf16", "--no-compile"))),
    Step("bench-train", 40, "training model: sqrt checkpointing against none",
         bench_step("bench-train", "train", ("--steps", "8"), ("--rows", "mechgpu-none", "mechgpu-sqrt"),
                    timed=False)),
    Step("bench-optim-many", 30, "10,000 x 1,000, AdamW, SGD and RMSprop: CUDA-graph replay and host time per step",
         bench_step("bench-optim-many", "optim", ("--lists", "10k-x-1k"),
                    ("--no-compile", "--optimizers", "AdamW", "SGD", "RMSprop"))),
    Step("bench-dram", 20, "DRAM throughput of AdamW at 1B, fp32 against bf16 + fp32 masters, each as a "
         "fraction of copy bandwidth in the same run", dram_step),
    Step("fit", 25, "mechgpu fit unconstrained, then with a quarter of that peak as the budget", fit_step),
)
BENCH_SCRIPTS = ("optim", "clip", "activations", "train", "mixed_precision")


def plan(steps: tuple[Step, ...], budget_s: float) -> list[tuple[Step, bool]]:
    """Each step, and whether it fits: steps run in order while their estimates fit in what is left."""
    left, out = budget_s, []
    for step in steps:
        fits = step.estimate_s <= left
        if fits:
            left -= step.estimate_s
        out.append((step, fits))
    return out


def print_plan(steps: tuple[Step, ...], budget_s: float) -> float:
    rows = plan(steps, budget_s)
    total = sum(step.estimate_s for step, fits in rows if fits)
    width = max(len(step.name) for step in steps)
    print(f"device session plan (budget {budget_s:.0f} s; estimates for an H100/H200):")
    cumulative = 0.0
    for step, fits in rows:
        cumulative += step.estimate_s if fits else 0.0
        mark = f"{cumulative:5.0f} s" if fits else " dropped: over budget"
        print(f"  {step.name:<{width}}  {step.estimate_s:4.0f} s  {mark}  {step.what}")
        print(f"  {'':<{width}}          basis: {ESTIMATES_BASIS[step.name]}")
    print(f"planned total: {total:.0f} s of {budget_s:.0f} s")
    return total


# ----------------------------------------------------------------------------------
# running the plan, and what it writes
# ----------------------------------------------------------------------------------
def run_steps(s: Session, steps: tuple[Step, ...]) -> None:
    stopped = None  # why the remaining steps do not run
    for step in steps:
        record = {"step": step.name, "what": step.what, "estimate_s": step.estimate_s, "wall_s": None}
        left = s.left_s()
        if stopped:
            record["status"] = f"skipped: {stopped}"
        elif step.estimate_s > left and not s.smoke:
            record["status"] = f"skipped: its estimate, {step.estimate_s:.0f} s, is over the {max(left, 0):.0f} s left"
        else:
            print(f"\n=== {step.name} ({step.what}); estimate {step.estimate_s:.0f} s, {left:.0f} s left", flush=True)
            started = time.monotonic()
            deadline = started + (left if s.smoke else min(left, 2 * step.estimate_s + 60))
            try:
                record.update(step.run(s, deadline))
            except subprocess.TimeoutExpired:
                record["status"] = "killed: out of time"
            except Exception as exc:  # a broken step is recorded; the session goes on
                record["status"] = "failed"
                record["error"] = f"{type(exc).__name__}: {exc}"
            record["wall_s"] = round(time.monotonic() - started, 1)
            if step.name == "preflight" and record["status"] != "ok":
                stopped = "the preflight failed"
            log = s.steps_dir / f"{step.name}.log"
            record["log"] = log.relative_to(s.out).as_posix() if log.exists() else None
            if record["status"] != "ok":
                print(_tail(log), flush=True)
        print(f"--- {step.name}: {record['status']}" + (f" in {record['wall_s']} s" if record["wall_s"] else ""),
              flush=True)
        s.results.append(record)
        write_summary(s)


def merge_benchmarks(session_json: Path) -> list[Path]:
    """The benchmark steps' files merged into ``<device>.json``, ``.md`` and plots, as ``mechgpu bench``
    does; run in a new process (``--merge``), where the installed mechgpu imports."""
    from mechgpu.tools import bench

    doc = json.loads(session_json.read_text())
    out = session_json.parent
    slug = bench.device_slug(doc["device"])
    parts = {script: sorted((out / f"{slug}-session").glob(f"bench-*/*-{script}.json")) for script in BENCH_SCRIPTS}
    if not any(parts.values()):
        return []
    with tempfile.TemporaryDirectory(prefix="mechgpu-session-parts-") as tmp:
        for script, paths in parts.items():
            if not paths:
                continue
            combined = json.loads(paths[0].read_text())
            markdown = [paths[0].with_suffix(".md").read_text()]
            for path in paths[1:]:  # optim runs in two steps: its lists merge, rows keyed by what they time
                more = json.loads(path.read_text())
                combined.setdefault("lists", {}).update(more.get("lists", {}))
                keys = {tuple(r.get(k) for k in ("list", "optimizer", "implementation")) for r in more["rows"]}
                combined["rows"] = [r for r in combined["rows"] if tuple(
                    r.get(k) for k in ("list", "optimizer", "implementation")) not in keys] + more["rows"]
                markdown.append(path.with_suffix(".md").read_text())
            stem = Path(tmp) / f"{slug}-{script}"
            stem.with_suffix(".json").write_text(json.dumps(combined))
            stem.with_suffix(".md").write_text("\n\n".join(markdown))
        merged = bench.merge(Path(tmp), list(BENCH_SCRIPTS), device=doc["device"], smoke=doc["smoke"], quick=True)
    merged["session"] = {"warmup_ms": doc["warmup_ms"], "rep_ms": doc["rep_ms"]}
    return bench.write(merged, out)


def summary(s: Session) -> dict:
    return {"kind": "device session", "device": s.device, "smoke": s.smoke, "budget_s": s.budget_s,
            "warmup_ms": s.warmup_ms, "rep_ms": s.rep_ms,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.monotonic() - s.start, 1), "steps": s.results,
            **{k: v for k, v in (s.results[0] if s.results and s.results[0]["step"] == "preflight" else {}).items()
               if k in ("torch", "triton", "python", "cuda_runtime")}}


def to_markdown(doc: dict) -> str:
    from _common import markdown_table

    from mechgpu.tools.bench import session_findings

    kind = ("CPU smoke run (interpreter; shows the session works, measures nothing)" if doc["smoke"]
            else "device session")
    head = [f"# mechgpu device session: {doc['device']}", "",
            f"{kind}; torch {doc.get('torch')}, triton {doc.get('triton')}, {doc['date']}; "
            f"budget {doc['budget_s']:.0f} s, used {doc['wall_s']:.0f} s; do_bench warmup {doc['warmup_ms']:g} ms, "
            f"rep {doc['rep_ms']:g} ms.", ""]
    rows = [[r["step"], r["status"], session_findings(r), f"{r['estimate_s']:.0f}",
             "–" if r["wall_s"] is None else f"{r['wall_s']:.0f}"] for r in doc["steps"]]
    table = markdown_table(["step", "status", "found", "estimate s", "wall s"], rows, text_columns=3)
    return "\n".join(head + [table, ""] + clip_markdown(doc) + dram_markdown(doc))


def _finding(doc: dict, key: str) -> dict | None:
    """The record entry ``key`` (``clip``, ``dram``) of the step that has one, or None."""
    return next((r[key] for r in doc["steps"] if r.get(key)), None)


def clip_markdown(doc: dict) -> list[str]:
    """The bench-clip step's table of state precisions (none where it did not finish)."""
    clip = _finding(doc, "clip")
    if clip is None:
        return []
    from _common import markdown_table

    info = clip["list"]
    text = ["## AdamW + clip to max norm: fp32, bf16 and 8-bit states against torch", "",
            f"{info['name']} list ({info['tensors']:,} tensors, {info['params']:,} params), fp32 params and grads; "
            "B/param from `mechgpu.traffic` over the list's tensors; GB/s = bytes / the median step time "
            f"({clip['timing']['method']}); copy {clip['copy_gbps']:,.1f} GB/s in the same run; torch x: torch's "
            "clip_grad_norm_ + fused AdamW's ms over the row's.", ""]
    rows = [[f"({r['variant']}) {r['implementation']}", r["state_dtype"], f"{r['bytes_per_param']:.4g}",
             f"{r['ms']:.3f}", f"{r['gbps']:,.1f}", f"{r['copy_fraction']:.1%}", f"{r['vs_torch']:.2f}"]
            for r in [*clip["rows"], clip["torch"]]]
    return text + [markdown_table(["variant", "states", "B/param", "ms", "GB/s", "of copy", "torch x"], rows,
                                  text_columns=2), ""]


def dram_markdown(doc: dict) -> list[str]:
    """The bench-dram step's table (none where it did not finish): per mode, effective GB/s and
    its fraction of the copy bandwidth measured in the same run."""
    dram = _finding(doc, "dram")
    if dram is None:
        return []
    from _common import markdown_table

    info = dram["list"]
    text = ["## DRAM throughput of the AdamW step, without ncu", "",
            f"{info['name']} list ({info['tensors']:,} tensors, {info['params']:,} params); effective GB/s = "
            "`mechgpu.traffic.optimizer_step_bytes` x params / the median step time "
            f"({dram['timing']['method']}); copy: `dst.copy_(src)` of {dram['copy_buffer_bytes'] / 2**30:.2f} GiB, "
            f"{dram['copy_gbps']:,.1f} GB/s in the same run.", ""]
    rows = [[r["mode"], str(r["bytes_per_param"]), f"{r['ms']:.3f}", f"{r['gbps']:,.1f}", f"{r['copy_fraction']:.1%}"]
            for r in dram["rows"]]
    first, *others = dram["rows"]
    ratios = [f"{r['mode']} reaches {r['copy_fraction'] / first['copy_fraction']:.2f}x the {first['mode']} "
              "step's fraction of copy bandwidth." for r in others]
    return text + [markdown_table(["AdamW mode", "B/param", "ms", "GB/s", "of copy"], rows), "", *ratios, ""]


def write_summary(s: Session) -> None:
    """``<device>-session.json`` and ``.md``, then the archive: after every step, so a killed run keeps its results."""
    doc = summary(s)
    stem = s.out / f"{s.slug}-session"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(doc))
    if s.archive:
        s.archive.parent.mkdir(parents=True, exist_ok=True)
        partial = s.archive.with_name(s.archive.name + ".partial")
        with tarfile.open(partial, "w:gz") as tar:
            for path in sorted(s.out.iterdir()):
                tar.add(path, arcname=path.name)
        partial.replace(s.archive)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for every result (required unless --dry-run)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole session (default: {DEFAULT_BUDGET_S})")
    parser.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], default=None,
                        help="run only these steps (default: all; preflight always runs)")
    parser.add_argument("--warmup-ms", type=float, default=SESSION_WARMUP_MS, help="do_bench warm-up per timed call")
    parser.add_argument("--rep-ms", type=float, default=SESSION_REP_MS, help="do_bench repetitions per timed call")
    parser.add_argument("--archive", type=Path, default=None,
                        help="also write everything in --out into this .tar.gz, after every step")
    parser.add_argument("--merge", type=Path, default=None, help=argparse.SUPPRESS)  # see merge_benchmarks
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan with each step's estimate and exit")
    mode.add_argument("--cpu-smoke", action="store_true",
                      help="every step's plumbing on CPU with tiny sizes, kernels in Triton's interpreter")
    args = parser.parse_args(argv)

    if args.merge:
        print("wrote " + ", ".join(p.name for p in merge_benchmarks(args.merge)), flush=True)
        return 0
    steps = tuple(s for s in STEPS if not args.steps or s.name in args.steps or s.name == "preflight")
    if args.dry_run:
        print_plan(steps, args.budget)
        return 0
    if args.out is None:
        parser.error("--out is required")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: --cpu-smoke runs the session's plumbing on CPU, --dry-run prints the plan")
    args.out.mkdir(parents=True, exist_ok=True)
    s = Session(out=args.out, smoke=args.cpu_smoke, budget_s=args.budget, warmup_ms=args.warmup_ms,
                rep_ms=args.rep_ms, device="cpu" if args.cpu_smoke else torch.cuda.get_device_name(0),
                archive=args.archive)
    print_plan(steps, args.budget)
    run_steps(s, steps)
    if any(r["step"].startswith("bench-") and r["status"] == "ok" for r in s.results):
        s.python("merge", [__file__, "--merge", str(s.out / f"{s.slug}-session.json")],
                 deadline=time.monotonic() + MERGE_S)
        write_summary(s)  # the archive takes the merged files
    print(f"\n{to_markdown(summary(s))}")
    print(f"wrote {s.slug}-session.json, .md and the merged benchmarks in {s.out}; logs in {s.steps_dir}")
    return 0 if all(r["status"] == "ok" for r in s.results) else 1


if __name__ == "__main__":
    sys.exit(main())
