"""mechgpu.train.fit on CPU: the plan frontier against brute force, the choice under budgets from
tight to loose (measured peak within the budget, never slower when looser), a clear error below
what the model needs, gradients equal to a full-batch step in float64, and ``mechgpu fit``."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from conftest import Recorder
from mechgpu.kernels.quant8 import absmax_count
from torch import nn

import mechgpu.optim as mo
from mechgpu.cli import main
from mechgpu.optim.quant8 import MIN_8BIT_NUMEL, STATE_8BIT
from mechgpu.tools.gpt import CharGPT, TokenLoss, init_gpt
from mechgpu.traffic import optimizer_state_bytes
from mechgpu.train import BlockProfile, BudgetTooSmall, Trainer, make_plan, plan_frontier, predict
from mechgpu.train.fit import choose, confirm, probe

VOCAB, CONTEXT, DIM, DEPTH, HEADS = 11, 8, 16, 3, 2
GLOBAL_BATCH = 4


# ---------------------------------------------------------------------------- the frontier
def _all_plans(n: int):
    """Every way to cut a chain of n blocks into pieces and checkpoint some of them."""
    for cuts in itertools.product([0, 1], repeat=n - 1):
        bounds = [0] + [i for i, cut in enumerate(cuts, 1) if cut] + [n]
        pieces = list(zip(bounds, bounds[1:]))
        for chosen in itertools.product([0, 1], repeat=len(pieces)):
            yield [p for p, c in zip(pieces, chosen) if c]


@pytest.mark.parametrize("seed", range(4))
def test_frontier_is_optimal_on_synthetic_chains(seed):
    """For any peak budget, the frontier's fastest plan within it recomputes no more than the best
    of every possible plan (up to the programme's rounding of bytes)."""
    gen = torch.Generator().manual_seed(seed)
    n, resolution = 6, 4096
    a = torch.randint(100, 5000, (n,), generator=gen).tolist()
    x = [v // 10 for v in torch.randint(100, 5000, (n,), generator=gen).tolist()]
    t = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    profile = BlockProfile(a, x, t, other=300)
    frontier = plan_frontier(profile, resolution=resolution)
    scored = [predict(profile, plan) for plan in frontier]
    assert frontier[-1] == [], "checkpointing nothing is the frontier's last plan"
    assert all(p0[1] < p1[1] and p0[2] > p1[2] for p0, p1 in zip(scored, scored[1:])), scored
    every = [predict(profile, plan) for plan in _all_plans(n)]
    slack = n * -(-(sum(a) + sum(x)) // resolution)  # each block's bytes rounded up by at most a unit
    for budget in sorted({peak for _, peak, _ in every})[::3]:
        best = min(recompute for _, peak, recompute in every if peak <= budget)
        ours = min((recompute for _, peak, recompute in scored if peak <= budget + slack), default=math.inf)
        assert ours <= best + 1e-12, f"peak budget {budget}: frontier recomputes {ours}, the best plan {best}"


def test_explicit_segments_are_a_plan():
    assert make_plan([(0, 2)], 3).segments == [(0, 2)]
    assert make_plan([[0, 1], [1, 3]], 3).segments == [(0, 1), (1, 3)]  # as read back from fit.json
    assert make_plan([], 3).segments == []
    for bad in ([(1, 1)], [(0, 2), (1, 3)], [(0, 4)], [(0, 1.5)], [(2, 3), (0, 1)], [(0, 1, 2)]):
        with pytest.raises(ValueError, match=r"each must be a \(start, end\) pair with 0 <= start < end <= 3"):
            make_plan(bad, 3)


# ---------------------------------------------------------------------------- the char GPT
def _model(dtype=torch.float32, dropout=0.1, torch_baseline=False) -> CharGPT:
    torch.manual_seed(0)
    model = CharGPT(VOCAB, CONTEXT, DIM, DEPTH, HEADS, dropout, torch_baseline=torch_baseline)
    init_gpt(model, 0)
    return model.to(dtype)


def _sampler(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def sample_batch(micro: int):
        ids = torch.randint(0, VOCAB, (micro, CONTEXT + 1), generator=gen)
        return ids[:, :-1], ids[:, 1:]

    return sample_batch


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return mo.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, track_update_norm=True)


@pytest.fixture(scope="module")
def probes():
    return probe(_model(), TokenLoss(), _adamw, _sampler(), global_batch=GLOBAL_BATCH, blocks="blocks")


def test_probes_measure_every_size_and_the_optimizers_bytes(probes):
    assert [p.micro_batch for p in probes.micros] == [1, 2, 4] and not probes.skipped
    params = [p for p in _model().parameters()]
    elements = sum(p.numel() for p in params)
    assert probes.static == {"params_bytes": 4 * elements, "grads_bytes": 4 * elements,
                             "optimizer_state_bytes": optimizer_state_bytes("AdamW") * elements + 4 * len(params)}
    for p in probes.micros:  # one micro-batch of p.micro_batch sequences, every token counted
        assert p.items == p.micro_batch * CONTEXT and p.forward_s > 0 and p.backward_s > 0
        assert p.plans[-1] == [] and len(p.plans) > 1
    sizes = [p.profile.total for p in probes.micros]
    assert sizes == sorted(sizes) and sizes[0] > 0


def test_budgets_from_tight_to_loose(probes):
    """Every candidate's peak is a budget where the choice changes; a looser one never chooses a
    slower predicted configuration, and what runs stays within the budget."""
    model = probes.job.model
    before = copy.deepcopy(model.state_dict())
    candidates = probes.candidates()
    peaks = sorted({c.peak_bytes for c in candidates})
    assert peaks[0] > probes.least_static_bytes
    budgets = [*peaks, 2 * peaks[-1]]
    choices = [choose(probes, budget) for budget in budgets]
    for budget, choice in zip(budgets, choices):
        fitting = [c for c in candidates if c.peak_bytes <= budget]
        assert choice.chosen in fitting and choice.chosen.tokens_per_s == max(c.tokens_per_s for c in fitting)
    speeds = [choice.chosen.tokens_per_s for choice in choices]
    assert speeds == sorted(speeds), speeds
    tight = choices[0].chosen
    assert tight.micro_batch == 1 and tight.accum_steps == GLOBAL_BATCH and tight.segments, tight
    for choice in (choices[0], choices[len(choices) // 2], choices[-1]):
        result = confirm(choice, steps=2)
        assert result.measured_peak_bytes <= choice.budget, result.report()
        # on CPU the measured peak is the static bytes and the saved activations: exactly the prediction
        assert result.measured_peak_bytes == choice.chosen.saved_bytes, result.report()
        assert result.tokens_per_s > 0
        assert "<- chosen" in result.report() and "chosen: micro-batch" in result.report()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "confirm changed the model's weights"
    assert not any(getattr(b, "_mechgpu_checkpointed", False) for b in model.blocks), "checkpointing left applied"


def test_a_budget_too_small_names_the_least_needed(probes):
    least = min(c.peak_bytes for c in probes.candidates())
    with pytest.raises(BudgetTooSmall, match="below the static memory alone") as info:
        choose(probes, probes.least_static_bytes - 1)
    assert "the least any configuration needs is" in str(info.value) and f"({least} bytes)" in str(info.value)
    with pytest.raises(BudgetTooSmall, match=rf"too small for any configuration.*\({least} bytes\)"):
        choose(probes, least - 1)
    assert choose(probes, least).chosen.peak_bytes == least


def _full_batch_grads(model: nn.Module, micro_batches: list) -> list[torch.Tensor]:
    x = torch.cat([b[0] for b in micro_batches])
    y = torch.cat([b[1] for b in micro_batches])
    loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))  # mean over counted tokens
    loss.backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("where", ["tight", "middle"])
def test_chosen_configuration_grads_equal_a_full_batch_step_float64(probes, where):
    peaks = sorted({c.peak_bytes for c in probes.candidates()})
    chosen = choose(probes, peaks[0] if where == "tight" else peaks[len(peaks) // 2]).chosen
    if where == "tight":
        assert chosen.accum_steps > 1 and chosen.segments, chosen
    model = _model(torch.float64, dropout=0.0, torch_baseline=True)  # torch's GELU in float64
    model.load_state_dict(_model().state_dict())
    reference = copy.deepcopy(model)
    x, y = _sampler(seed=1)(GLOBAL_BATCH)
    y = y.clone()
    y[torch.rand(y.shape, generator=torch.Generator().manual_seed(2)) < 0.3] = -100  # uneven token counts
    micro = [(x[i:i + chosen.micro_batch], y[i:i + chosen.micro_batch])
             for i in range(0, GLOBAL_BATCH, chosen.micro_batch)]
    assert len(micro) == chosen.accum_steps
    optimizer = Recorder(model.parameters())
    trainer = Trainer(model, TokenLoss(), optimizer, accum_steps=chosen.accum_steps,
                      checkpoint=list(chosen.segments), blocks="blocks", track_update_norm=False, warmup_steps=0)
    trainer.fit(micro, 1)
    assert trainer.plan.segments == list(chosen.segments)
    for i, (got, expected) in enumerate(zip(optimizer.grads[0], _full_batch_grads(reference, micro))):
        err = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
        assert err <= 1e-10, f"param {i}: relative error {err:.3e} ({chosen})"


# ---------------------------------------------------------------------------- mechgpu fit
TINY = ["--dim", "16", "--depth", "2", "--heads", "2", "--context", "8", "--device", "cpu"]


def test_cli_writes_fit_json(tmp_path, capsys):
    assert main(["fit", "--memory", "64MiB", "--global-batch", "2", "--steps", "2", "--out", str(tmp_path),
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "predicted tokens/s" in out and "<- chosen" in out and "peak memory: predicted" in out, out
    report = json.loads((tmp_path / "fit.json").read_text())
    assert {"budget_bytes", "chosen", "predicted_peak_bytes", "measured_peak_bytes", "tokens_per_s"} <= report.keys()
    assert set(report["chosen"]) == {"micro_batch", "accum_steps", "checkpoint", "state_dtype"}
    assert report["budget_bytes"] == 64 * 2**20
    assert report["chosen"]["micro_batch"] * report["chosen"]["accum_steps"] == 2
    assert report["measured_peak_bytes"] <= report["predicted_peak_bytes"] <= report["budget_bytes"]
    assert report["tokens_per_s"] > 0 and len(report["candidates"]) >= 4


def test_cli_budget_below_static_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--memory", "1KiB", "--global-batch", "2", *TINY])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mechgpu fit "), err
    last = err.strip().splitlines()[-1]
    assert "argument --memory: memory budget 1.00 KiB is below the static memory alone" in last, err
    assert "the least any configuration needs is" in last and "Traceback" not in err


def test_table_shows_per_size_the_least_memory_the_fastest_fitting_and_no_checkpointing():
    from mechgpu._text import format_bytes
    from mechgpu.train.checkpointing import describe_segments
    from mechgpu.train.fit import MicroProbe, Probes

    gen = torch.Generator().manual_seed(0)
    n = 8
    profile = BlockProfile(torch.randint(1000, 2000, (n,), generator=gen).tolist(), [100] * n,
                           torch.rand(n, generator=gen, dtype=torch.float64).tolist(), other=300)
    plans = plan_frontier(profile)
    assert len(plans) > 3
    micros = [MicroProbe(m, 8 * m, profile, 1.0, 2.0, plans) for m in (1, 2)]
    probes = Probes(2, 1, {"params_bytes": 10}, 0.0, micros, {}, job=None)
    budget = predict(profile, plans[len(plans) // 2])[1] + 10
    choice = choose(probes, budget)
    rows = choice.table().splitlines()[2:]
    assert rows[-1] == f"(6 of {2 * len(plans)} candidates shown; fit.json lists them all)", rows
    for micro in (1, 2):
        group = [c for c in choice.candidates if c.micro_batch == micro]
        fastest = max((c for c in group if c.peak_bytes <= budget), key=lambda c: c.tokens_per_s)
        shown = [r for r in rows[:-1] if r.split()[0] == str(micro)]
        expected = [group[0], fastest, group[-1]]  # least memory, fastest within the budget, no checkpointing
        assert len(shown) == 3 and group[-1].segments == (), rows
        for row, c in zip(shown, expected):
            assert f"  {describe_segments(c.segments)}  " in row and format_bytes(c.peak_bytes) in row, (row, c)
    assert choice.chosen == fastest and sum("<- chosen" in r for r in rows) == 1


@pytest.fixture(scope="module")
def wide_probes():
    """A model whose matrices have >= MIN_8BIT_NUMEL elements, so that 8-bit states apply to them."""
    torch.manual_seed(0)
    model = CharGPT(VOCAB, CONTEXT, 64, 2, HEADS, 0.0)
    init_gpt(model, 0)
    assert any(p.numel() >= MIN_8BIT_NUMEL for p in model.parameters())
    return probe(model, TokenLoss(), _adamw, _sampler(), global_batch=GLOBAL_BATCH, micro_batches=[1, 4],
                 blocks="blocks", repeats=1)


def _state_bytes(params: list[torch.Tensor], state_dtype) -> int:
    """AdamW's state bytes by the byte model: per tensor two states and a step counter; 8-bit states
    are a code per element and an fp32 absmax per block, for tensors of at least MIN_8BIT_NUMEL."""
    total = 0
    for p in params:
        if state_dtype == STATE_8BIT and p.numel() >= MIN_8BIT_NUMEL:
            total += 2 * (p.numel() + 4 * absmax_count(p.numel()))
        else:
            size = 2 if state_dtype == torch.bfloat16 else 4
            total += optimizer_state_bytes("AdamW", size) * p.numel()
        total += 4
    return total


def test_state_precision_is_a_fourth_axis(wide_probes, tmp_path):
    """fp32, bf16 and 8-bit states: measured state bytes equal the byte model; a budget only 8-bit
    states fit chooses them (and runs within it), one that bf16 fits but fp32 does not chooses the
    faster of bf16 and 8-bit, and one that every precision fits chooses the fastest of all."""
    probes = wide_probes
    params = list(probes.job.model.parameters())
    assert [s.state_dtype for s in probes.states] == [torch.float32, torch.bfloat16, STATE_8BIT]
    for state in probes.states:
        assert state.optimizer_state_bytes == _state_bytes(params, state.state_dtype), state
    assert probes.static["optimizer_state_bytes"] == probes.states[0].optimizer_state_bytes
    candidates = probes.candidates()
    least = {s.state_dtype: min(c.peak_bytes for c in candidates if c.state_dtype == s.state_dtype)
             for s in probes.states}
    assert least[STATE_8BIT] < least[torch.bfloat16] < least[torch.float32], least

    only_8bit = choose(probes, least[STATE_8BIT])
    assert only_8bit.chosen.state_dtype == STATE_8BIT and "8bit" in only_8bit.table()
    no_fp32 = choose(probes, least[torch.bfloat16])
    fitting = [c for c in candidates if c.peak_bytes <= least[torch.bfloat16]]
    assert {c.state_dtype for c in fitting} == {torch.bfloat16, STATE_8BIT}
    assert no_fp32.chosen.tokens_per_s == max(c.tokens_per_s for c in fitting)
    loose = choose(probes, 2 * max(c.peak_bytes for c in candidates))
    assert loose.chosen.tokens_per_s == max(c.tokens_per_s for c in candidates), "a loose budget lost speed"

    result = confirm(only_8bit, steps=2)
    # on CPU the measured peak is the static bytes (8-bit states included) and one micro-batch's saved activations
    assert result.measured_peak_bytes == only_8bit.chosen.saved_bytes <= only_8bit.budget, result.report()
    assert "optimizer states: 8bit" in result.report()
    assert json.loads(result.write(tmp_path).read_text())["chosen"]["state_dtype"] == "8bit"
    trainer, _ = result.apply(torch.utils.data.TensorDataset(*_sampler()(GLOBAL_BATCH)))
    assert trainer.optimizer.state_dtype == STATE_8BIT


def test_a_precision_the_optimizer_refuses_is_left_out():
    """RMSprop's centered=True refuses 8-bit states: fit considers fp32 and bf16 only, and the
    optimizer keeps the state dtype it was made with."""
    torch.manual_seed(0)
    model = CharGPT(VOCAB, CONTEXT, 64, 1, HEADS, 0.0)
    made = []

    def centered(m):
        made.append(mo.RMSprop(m.parameters(), lr=1e-3, centered=True))
        return made[-1]

    probes = probe(model, TokenLoss(), centered, _sampler(), global_batch=2, micro_batches=[2], blocks="blocks",
                   repeats=1)
    assert [s.state_dtype for s in probes.states] == [torch.float32, torch.bfloat16]
    assert made[0].state_dtype == torch.float32


def test_apply_gives_the_chosen_trainer_and_loader(probes):
    """FitResult.apply: a Trainer with the chosen accumulation and checkpoint plan (and the
    options given), a DataLoader at the chosen micro-batch size; one step is one global batch."""
    from mechgpu.train.checkpointing import clear_checkpointing
    from mechgpu.train.fit import FitResult

    choice = choose(probes, min(c.peak_bytes for c in probes.candidates()))
    chosen = choice.chosen
    assert chosen.accum_steps > 1 and chosen.segments, chosen
    x, y = _sampler(seed=3)(GLOBAL_BATCH)
    optimizer = Recorder(probes.job.model.parameters())  # lr=0: the shared model keeps its weights
    trainer, loader = FitResult(choice, 0, "", 0.0, 0.0, 0).apply(
        torch.utils.data.TensorDataset(x, y), optimizer, loader_options={"shuffle": False}, log_every=2)
    try:
        assert trainer.optimizer is optimizer and trainer.log_every == 2 and trainer.model is probes.job.model
        assert (trainer.accum_steps, trainer.policy, loader.batch_size) == (chosen.accum_steps, list(chosen.segments),
                                                                         chosen.micro_batch)
        trainer.fit(loader, steps=1)
        assert trainer.plan.segments == list(chosen.segments)
        assert (trainer.history[0]["micro_batches"], trainer.history[0]["samples"]) == (chosen.accum_steps,
                                                                                        GLOBAL_BATCH)
    finally:
        clear_checkpointing(probes.job.model.blocks)
