"""mechgpu.optim and mechgpu.clip under torch.distributed: two gloo ranks on CPU.

Two spawned processes (tests/_dist_worker.py, one start-up for the whole module) run every
scenario: each trains one tiny model three ways from the same init and data, every rank
on its own shard of each batch:

* ``torch``: torch.optim + torch.nn.utils.clip_grad_norm_;
* ``mechgpu_clip``: mechgpu.optim + mechgpu.clip.clip_grad_norm_;
* ``mechgpu_fused``: mechgpu.optim with ``max_grad_norm`` (clipping inside the step).

FSDP2 (``fully_shard`` on a 1-D CPU mesh; params and grads are DTensors, shards are uneven
and one rank holds empty shards) and DDP (replicated params; grads all-reduced, in one
scenario as views into DDP's buckets, most at offsets that are not 16-byte aligned).
max_norm is far below the grad norm, so every step clips. The kernels run in triton's
interpreter (TRITON_INTERPRET=1 in the workers).

FSDP2 with 8-bit states (``fsdp_adamw_8bit``): torch has no 8-bit states, so mechgpu's runs are
compared with the same 8-bit optimizer in one process on the unsharded model and the whole batch
(whose blocks the shards share: see ``_dist_worker.MODEL_8BIT``), to fp32 tolerance but at
quantization ties; and with torch's fp32 AdamW, whose updates they follow within the 8-bit
scheme's error (``UPDATE_RTOL_8BIT``).
"""

from __future__ import annotations

import math
from pathlib import Path

import _dist_worker as worker
import pytest
import torch
import torch.distributed as dist
from conftest import spawn_interpreted

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch built without torch.distributed / gloo")

RTOL, ATOL = 1e-5, 1e-6
TIMEOUT_S = 300  # all scenarios together; they take ~30 s
MECHGPU_VARIANTS = ("mechgpu_clip", "mechgpu_fused")
FSDP = [name for name, spec in worker.SCENARIOS.items() if spec[0] == "fsdp" and name not in worker.EIGHT_BIT]
DDP = [name for name, spec in worker.SCENARIOS.items() if spec[0] == "ddp"]


def _spawn_all(tmp: Path) -> dict[str, list[dict] | str]:
    """Every scenario on one pair of ranks (one start-up, one process group): scenario ->
    [rank 0 results, rank 1 results], or a readable account of why it has none."""
    scenarios = list(worker.SCENARIOS)
    failure = spawn_interpreted(worker.run, (scenarios, str(tmp / "init"), str(tmp)), worker.WORLD_SIZE, TIMEOUT_S)

    outcome: dict[str, list[dict] | str] = {}
    first_failed = None
    for scenario in ["setup", *scenarios]:
        files = [tmp / f"{scenario}_rank{r}" for r in range(worker.WORLD_SIZE)]
        errors = "".join(f"\n--- rank {r} ---\n{f.with_suffix('.err').read_text()}"
                         for r, f in enumerate(files) if f.with_suffix(".err").exists())
        missing = scenario != "setup" and not all(f.with_suffix(".pt").exists() for f in files)
        if errors or (first_failed is None and failure and missing):
            outcome[scenario] = f"distributed scenario {scenario!r} failed: {failure}{errors}"
            first_failed = first_failed or scenario
        elif first_failed is not None:
            outcome[scenario] = (f"distributed scenario {scenario!r} did not run: the workers stopped at "
                                 f"{first_failed!r} (see its test):\n{outcome[first_failed]}")
        elif scenario != "setup":
            outcome[scenario] = [torch.load(f.with_suffix(".pt")) for f in files]
    return outcome


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results(scenario) -> [rank 0 results, rank 1 results]; the workers run once per module."""
    outcome: dict = {}

    def get(scenario: str) -> list[dict]:
        if not outcome:
            outcome.update(_spawn_all(tmp_path_factory.mktemp("distributed")))
        got = outcome[scenario]
        if isinstance(got, str):
            pytest.fail(got, pytrace=False)
        return got

    return get


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}\n{m}")


def _check_against_torch(scenario: str, ranks: list[dict]) -> None:
    _, opt_name, _, max_norm = worker.SCENARIOS[scenario]
    for rank, res in enumerate(ranks):
        assert not [w for w in res["warnings"] if "mechgpu" in w], (
            f"{scenario} rank {rank}: mechgpu warned (fell back to torch.optim?): {res['warnings']}")
        ref = res["torch"]
        # every step really clipped, so the comparison exercises the clip coefficient
        norms = torch.stack(ref["norms"])
        assert (norms > 10 * max_norm).all(), f"{scenario}: grad norms {norms.tolist()} do not clip at {max_norm}"
        for variant in MECHGPU_VARIANTS:
            got = res[variant]
            where = f"{scenario} rank {rank} {opt_name}: {variant} vs torch"
            _close(torch.stack(got["norms"]), norms, f"{where}: total grad norm per step (before clipping)")
            _close(torch.stack(got["losses"]), torch.stack(ref["losses"]), f"{where}: local loss per step")
            _close(torch.stack(got["global_losses"]), torch.stack(ref["global_losses"]),
                   f"{where}: global (all-reduced) loss per step")
            for i, (p, q) in enumerate(zip(got["params"], ref["params"], strict=True)):
                _close(p, q, f"{where}: full param {i} after {worker.STEPS} steps")
            assert got["states"].keys() == ref["states"].keys()
            for i, state in ref["states"].items():
                assert got["states"][i].keys() == state.keys(), f"{where}: state keys of param {i}"
                for key, value in state.items():
                    _close(got["states"][i][key], value, f"{where}: optimizer state {key!r} of param {i}")
        # mechgpu.clip.clip_grad_norm_ leaves the grads exactly as torch's clip does
        for i, (g, h) in enumerate(zip(res["mechgpu_clip"]["clipped_grads"], ref["clipped_grads"], strict=True)):
            _close(g, h, f"{scenario} rank {rank}: clipped full grad {i} (mechgpu.clip vs torch), last step")
        clipped_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in ref["clipped_grads"]]))
        what = f"{scenario} rank {rank}: norm of torch's clipped grads"
        torch.testing.assert_close(clipped_norm, torch.tensor(max_norm), rtol=1e-4, atol=0,
                                   msg=lambda m, what=what: f"{what}\n{m}")


@pytest.mark.parametrize("scenario", FSDP)
def test_fsdp2_matches_torch(results, scenario):
    ranks = results(scenario)
    for rank, res in enumerate(ranks):
        for variant in worker.VARIANTS:
            assert res[variant]["param_types"] == ["DTensor"], "fully_shard should make every param a DTensor"
        # uneven shards (33 rows -> 17/16) and rank 1's empty shards of the 1-wide head
        assert res["torch"]["local_numels"] == ([272, 17, 396, 12, 24, 1] if rank == 0 else
                                                [256, 16, 396, 12, 0, 0])
        # torch hands back a DTensor norm; mechgpu.clip a plain tensor holding the full norm
        assert res["torch"]["norm_types"] == ["DTensor"] * worker.STEPS
        assert res["mechgpu_clip"]["norm_types"] == ["Tensor"] * worker.STEPS
        assert res["mechgpu_fused"]["norm_types"] == ["Tensor"] * worker.STEPS  # last_grad_norm
    _check_against_torch(scenario, ranks)
    # the full params and states are the same whichever rank gathered them
    for variant in worker.VARIANTS:
        for i, (p, q) in enumerate(zip(ranks[0][variant]["params"], ranks[1][variant]["params"], strict=True)):
            assert torch.equal(p, q), f"{scenario} {variant}: full param {i} differs between ranks"


@pytest.mark.parametrize("scenario", FSDP)
def test_fsdp2_clip_norm_identical_on_every_rank(results, scenario):
    """Every rank computes the same total norm (so every rank clips its shards alike)."""
    ranks = results(scenario)
    for variant in worker.VARIANTS:
        for step in range(worker.STEPS):
            gathered = [res[variant]["norms_all_ranks"][step] for res in ranks]
            assert torch.equal(gathered[0], gathered[1]), f"{scenario} {variant} step {step}: all_gather differs"
            assert torch.equal(gathered[0], gathered[0][0].expand(worker.WORLD_SIZE)), (
                f"{scenario} {variant} step {step}: the clip norm differs between ranks: "
                f"{gathered[0].tolist()} (rank r's norm at index r)")


@pytest.mark.parametrize("scenario", DDP)
def test_ddp_matches_torch(results, scenario):
    ranks = results(scenario)
    for res in ranks:
        for variant in worker.VARIANTS:
            assert res[variant]["param_types"] == ["Parameter"]
    _check_against_torch(scenario, ranks)


@pytest.mark.parametrize("scenario", DDP)
def test_ddp_replicas_stay_identical(results, scenario):
    ranks = results(scenario)
    for variant in worker.VARIANTS:
        first, second = ranks[0][variant], ranks[1][variant]
        for i, (p, q) in enumerate(zip(first["params"], second["params"], strict=True)):
            assert torch.equal(p, q), f"{scenario} {variant}: param {i} differs between ranks after the steps"
        for i in first["states"]:
            for key, value in first["states"][i].items():
                assert torch.equal(value, second["states"][i][key]), (
                    f"{scenario} {variant}: optimizer state {key!r} of param {i} differs between ranks")
        assert torch.equal(torch.stack(first["norms"]), torch.stack(second["norms"])), (
            f"{scenario} {variant}: grad norms differ between ranks")
        assert torch.equal(torch.stack(first["global_losses"]), torch.stack(second["global_losses"]))
        assert not torch.equal(torch.stack(first["losses"]), torch.stack(second["losses"])), (
            "each rank should see its own shard of the batch")



#: 8-bit states against torch's fp32 AdamW: each param's update (final - initial) within this
#: fraction of torch's, in norm (the Adam direction's quantization error, ~3% an element)
UPDATE_RTOL_8BIT = 0.05
#: FSDP2's 8-bit run against the single-process one: the grads differ by the order of the
#: reduce-scatter's sums, which moves a code only where a value sits on a rounding tie; each
#: param's update within this fraction of the single-process run's, in norm
UPDATE_RTOL_SHARDED = 1e-4


def _updates(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p - q.detach() for p, q in zip(params, worker.make_model_8bit().parameters(), strict=True)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("scenario", worker.EIGHT_BIT)
def test_fsdp2_8bit_states(results, scenario):
    """Every rank quantizes the same params, by their global numel (the 8,064-element weight whose rank-1
    shard has 3,968 elements too), keeping its own shard's codes and block maxima; the run follows the
    single-process 8-bit run and torch's fp32 AdamW; each rank's state_dict resumes bit for bit."""
    from mechgpu.optim.quant8 import ABSMAX_SUFFIX, MIN_8BIT_NUMEL, absmax_count

    ranks = results(scenario)
    shapes = [(out, fan_in) if dim == 2 else (out,) for fan_in, out in worker.MODEL_8BIT for dim in (2, 1)]
    global_numels = [math.prod(shape) for shape in shapes]
    assert any(n >= MIN_8BIT_NUMEL for n in global_numels) and any(n < MIN_8BIT_NUMEL for n in global_numels)
    for rank, res in enumerate(ranks):
        assert not [w for w in res["warnings"] if "mechgpu" in w], res["warnings"]
        rows = [-(-shape[0] // 2) if rank == 0 else shape[0] // 2 for shape in shapes]
        local_numels = [r * math.prod(shape[1:]) for r, shape in zip(rows, shapes)]
        assert res["torch"]["local_numels"] == local_numels
        assert local_numels[2] == (4096 if rank == 0 else 3968)  # the 63 x 128 weight: over and under 4,096
        single = res[worker.SINGLE]
        for variant in MECHGPU_VARIANTS:
            got, where = res[variant], f"{scenario} rank {rank} {variant}"
            assert got["param_types"] == ["DTensor"]
            for i, (n, n_local) in enumerate(zip(global_numels, local_numels)):
                layout = got["state_layout"][i]
                for key in ("exp_avg", "exp_avg_sq"):
                    dtype, kind, numel = layout[key]
                    if n >= MIN_8BIT_NUMEL:
                        assert (dtype, kind, numel) == ("torch.uint8", "Tensor", n_local), (where, i, key, layout)
                        assert layout[key + ABSMAX_SUFFIX] == ("torch.float32", "Tensor", absmax_count(n_local))
                    else:
                        assert (dtype, kind) == ("torch.float32", "DTensor") and key + ABSMAX_SUFFIX not in layout
            _close(torch.stack(got["global_losses"]), torch.stack(single["global_losses"]),
                   f"{where}: global loss per step against the single-process 8-bit run")
            _close(torch.stack(got["norms"]), torch.stack(single["norms"]),
                   f"{where}: grad norm per step against the single-process 8-bit run")
            ours, alone, fp32 = _updates(got["params"]), _updates(single["params"]), _updates(res["torch"]["params"])
            for i, (u, v, w) in enumerate(zip(ours, alone, fp32, strict=True)):
                assert _relative(u, v) <= UPDATE_RTOL_SHARDED, (where, i, _relative(u, v))
                assert _relative(u, w) <= UPDATE_RTOL_8BIT, (where, i, _relative(u, w))
        assert res["mechgpu_fused"]["resumed_equal"] == [True] * len(shapes), res["mechgpu_fused"]["resumed_equal"]
    for variant in worker.VARIANTS:
        for i, (p, q) in enumerate(zip(ranks[0][variant]["params"], ranks[1][variant]["params"], strict=True)):
            assert torch.equal(p, q), f"{scenario} {variant}: full param {i} differs between ranks"
