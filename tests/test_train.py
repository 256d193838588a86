"""mechgpu.train on CPU: exact accumulation, checkpointing, the budget planner, the
saved-activation meter, bit-identical resume, and the `mechgpu train` / `profile` commands."""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Recorder
from torch import nn

import mechgpu.optim as mo
from mechgpu.tools.gpt import TokenLoss
from mechgpu.train import (
    ActivationMeter,
    BlockProfile,
    Trainer,
    checkpoint_blocks,
    find_blocks,
    make_plan,
    parse_bytes,
    plan_budget,
    predict,
    profile_blocks,
    to_device,
)

F_IN, VOCAB, T = 5, 7, 6


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.up, self.down, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.down(torch.tanh(self.up(x))))


class Net(nn.Module):
    """Token-wise model: (B, T, F_IN) -> (B, T, VOCAB) logits, through a ModuleList of blocks."""

    def __init__(self, hidden=(16, 16, 16, 16), dim: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(F_IN, dim)
        self.layers = nn.ModuleList([Block(dim, h, dropout) for h in hidden])
        self.out = nn.Linear(dim, VOCAB)

    def forward(self, x):
        x = self.inp(x)
        for block in self.layers:
            x = block(x)
        return self.out(x)


def _batches(sizes, seed=0, dtype=torch.float64, ignore_frac=0.3):
    """Micro-batches of uneven sizes with some targets ignored (-100), so token counts differ."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        x = torch.randn(b, T, F_IN, generator=gen, dtype=dtype)
        y = torch.randint(0, VOCAB, (b, T), generator=gen)
        y[torch.rand(b, T, generator=gen) < ignore_frac] = -100
        out.append((x, y))
    return out


def _full_batch_grads(model, window):
    model.zero_grad()
    x = torch.cat([b[0] for b in window])
    y = torch.cat([b[1] for b in window])
    loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))  # mean over non-ignored tokens
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads, loss.detach()


def _assert_rel(actual, expected, rel, what):
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
    assert err <= rel, f"{what}: relative error {err:.3e} > {rel:.0e}"


def _mean_token_loss(out, y):  # as HF and Lightning users write it: a mean over the non-ignored tokens
    return nn.functional.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))


class _MeanTokenLoss(nn.Module):
    reduction = "mean"

    def forward(self, out, y):
        return _mean_token_loss(out, y)


# (loss_fn, the Trainer's loss_reduction): summed, a mean found on the first micro-batch, a mean
# named by the loss's own reduction attribute, and a mean named by the argument
LOSSES = {"sum": (TokenLoss(), None), "mean-found": (_mean_token_loss, None),
          "mean-attribute": (_MeanTokenLoss(), None), "mean-argument": (_mean_token_loss, "mean")}


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("accum", [3, "all"])
def test_accumulation_equals_full_batch_float64(accum, loss_name):
    torch.manual_seed(0)
    model = Net().double()
    data = _batches([3, 1, 4, 2, 5, 1, 2])  # 7 micro-batches: windows of 3, 3 and a partial 1
    opt = Recorder(model.parameters())
    loss_fn, reduction = LOSSES[loss_name]
    trainer = Trainer(model, loss_fn, opt, accum_steps=accum, track_update_norm=False, warmup_steps=0,
                      loss_reduction=reduction)
    windows = [data[0:3], data[3:6], data[6:7]] if accum == 3 else [data]
    trainer.fit(data, len(windows))
    assert len(opt.grads) == len(windows)
    for step, window in enumerate(windows):
        expected, loss = _full_batch_grads(model, window)
        counts = [int((b[1] != -100).sum()) for b in window]
        assert len(set(counts)) > 1 or len(window) == 1, "the micro-batches should have uneven token counts"
        for i, (g, e) in enumerate(zip(opt.grads[step], expected)):
            _assert_rel(g, e, 1e-10, f"step {step} param {i} (window of {len(window)}, token counts {counts})")
        assert abs(trainer.history[step]["loss"] - loss.item()) <= 1e-10 * abs(loss.item())
        assert trainer.history[step]["micro_batches"] == len(window)
    assert trainer.loss_reduction == ("sum" if loss_name == "sum" else "mean")


def test_finding_the_reduction_leaves_no_trace():
    """With dropout, a run whose trainer found the mean on the first micro-batch is bit-identical
    to one that was told: the probe's forward draws nothing from the RNGs the run uses."""
    runs = []
    for reduction in (None, "mean"):
        torch.manual_seed(0)
        model = Net(dropout=0.3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        Trainer(model, _mean_token_loss, opt, accum_steps=2, warmup_steps=0, loss_reduction=reduction).fit(
            _batches([2, 3, 2], dtype=torch.float32), 2)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_loss_that_neither_sums_nor_averages_is_refused():
    model = Net().double()
    trainer = Trainer(model, lambda out, y: TokenLoss()(out, y) + 1.0, Recorder(model.parameters()),
                      warmup_steps=0)  # a sum plus a constant: twice the batch gives neither 2x nor 1x
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"neither sums nor averages .* pass loss_reduction='sum' or 'mean'"):
        trainer.fit(_batches([2, 3]), 1)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="reduction='sum' or 'mean', not 'none'"):
        Trainer(model, nn.CrossEntropyLoss(reduction="none"), Recorder(model.parameters()))


def test_mean_of_means_would_differ():
    """Guard for the test above: with these uneven counts, a mean of per-micro-batch means is
    measurably different, so the exact normalisation is really being tested."""
    torch.manual_seed(0)
    model = Net().double()
    window = _batches([3, 1, 4])
    expected, _ = _full_batch_grads(model, window)
    for x, y in window:
        (nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)) / len(window)).backward()
    diff = (model.inp.weight.grad - expected[0]).abs().max() / expected[0].abs().max()
    assert diff > 1e-3


@pytest.mark.parametrize("policy", ["all", "sqrt", 2, 3])
def test_checkpointed_grads_equal_plain_with_dropout(policy):
    grads = {}
    for name in ("none", policy):
        torch.manual_seed(0)
        model = Net(hidden=(16, 8, 32, 16, 8, 24), dropout=0.3).double()
        opt = Recorder(model.parameters())
        trainer = Trainer(model, TokenLoss(), opt, accum_steps=2, checkpoint=name, track_update_norm=False)
        torch.manual_seed(1)
        trainer.fit(_batches([4, 3, 2, 5]), 2)
        grads[name] = opt.grads
        if name != "none":
            assert trainer.plan.segments, f"policy {policy!r} checkpointed nothing"
    for step, (got, ref) in enumerate(zip(grads[policy], grads["none"])):
        for i, (g, r) in enumerate(zip(got, ref)):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14,
                                       msg=lambda m, i=i, step=step: f"step {step} param {i}: {m}")


def test_policies_give_expected_segments():
    assert make_plan("none", 9).segments == []
    assert make_plan("all", 3).segments == [(0, 1), (1, 2), (2, 3)]
    assert make_plan("sqrt", 9).segments == [(0, 3), (3, 6)]  # 3 segments, the last not checkpointed
    assert make_plan(2, 8).segments == [(0, 4)]
    assert make_plan("4", 8).segments == [(0, 2), (2, 4), (4, 6)]
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("300MB") == 300 * 10**6 and parse_bytes(17) == 17
    with pytest.raises(ValueError, match="size in bytes"):
        make_plan("lots", 4, BlockProfile([1] * 4, [1] * 4, [1.0] * 4, 0))


def _brute_force(profile: BlockProfile, budget: int) -> float:
    """Least recompute time over every way to cut the chain into plain blocks and segments."""
    n = len(profile.a)
    best = float("inf")
    for cuts in itertools.product([0, 1], repeat=n - 1):
        pieces, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                pieces.append((start, i))
                start = i
        pieces.append((start, n))
        for chosen in itertools.product([0, 1], repeat=len(pieces)):
            segments = [p for p, c in zip(pieces, chosen) if c]
            saved, _, recompute = predict(profile, segments)
            if saved <= budget:
                best = min(best, recompute)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_planner_is_optimal_on_synthetic_chains(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 7
    a = (torch.randint(100, 5000, (n,), generator=gen)).tolist()
    x = [v // 10 for v in (torch.randint(100, 5000, (n,), generator=gen)).tolist()]
    t = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    profile = BlockProfile(a, x, t, other=300)
    for frac in (0.2, 0.5, 0.8):
        budget = int(profile.other + frac * sum(a))
        segments = plan_budget(profile, budget, resolution=4096)
        saved, _, recompute = predict(profile, segments)
        assert saved <= budget
        assert recompute <= _brute_force(profile, budget) * (1 + 1e-9) + 0.02 * sum(t), (segments, frac)


def _measure(model, batch, policy, profile=None):
    name, blocks = find_blocks(model)
    plan = make_plan(policy, len(blocks), profile)
    checkpoint_blocks(blocks, plan.segments)
    with ActivationMeter(model) as meter:
        loss = TokenLoss()(model(batch[0]), batch[1])
    loss.backward()
    model.zero_grad()
    return plan, meter.bytes


def test_planner_meets_budget_on_uneven_blocks():
    torch.manual_seed(0)
    model = Net(hidden=(512, 16, 256, 32, 1024, 64, 128, 8), dim=8)
    batch = _batches([16], dtype=torch.float32)[0]
    name, blocks = find_blocks(model)
    assert name == "layers"
    profile = profile_blocks(model, blocks, lambda: TokenLoss()(model(batch[0]), batch[1]))
    assert len(set(profile.a)) == len(profile.a), "the blocks should differ in size"
    _, full = _measure(model, batch, "none")
    assert full == profile.total
    for frac in (0.3, 0.5, 0.75):
        budget = int(frac * full)
        plan, measured = _measure(model, batch, budget_str(budget), profile)
        assert measured <= budget, f"budget {budget}: measured {measured} ({plan.describe()})"
        assert measured == plan.predicted_saved, plan.describe()
        assert budget - measured < 0.35 * full, "the plan leaves far more room than it needs"
    with pytest.raises(ValueError, match="cannot be met|below"):
        make_plan("1B", len(blocks), profile)


def budget_str(n: int) -> str:
    return f"{n}B"


@pytest.mark.parametrize("policy", ["all", "sqrt", 2])
def test_saved_bytes_drop_by_predicted_factor(policy):
    torch.manual_seed(0)
    model = Net(hidden=(64,) * 9, dim=16)
    batch = _batches([32], dtype=torch.float32)[0]
    _, blocks = find_blocks(model)
    profile = profile_blocks(model, blocks, lambda: TokenLoss()(model(batch[0]), batch[1]))
    _, none = _measure(model, batch, "none")
    plan, measured = _measure(model, batch, policy, profile)
    predicted_factor = profile.total / plan.predicted_saved
    measured_factor = none / measured
    assert measured_factor > 1.5, f"{policy}: saved bytes fell only {measured_factor:.2f}x"
    assert abs(measured_factor / predicted_factor - 1) < 0.02, (
        f"{policy}: measured drop {measured_factor:.3f}x, predicted {predicted_factor:.3f}x")


def _gpt_trainer(tmp_path, checkpoint="sqrt"):
    import mechgpu.optim as mo
    from mechgpu.tools.gpt import CharGPT, init_gpt

    torch.manual_seed(0)
    model = CharGPT(vocab=11, context=8, dim=16, depth=3, heads=2, dropout=0.2)
    init_gpt(model, 0)
    opt = mo.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return Trainer(model, TokenLoss(), opt, scheduler=sched, accum_steps=2, checkpoint=checkpoint,
                   log_dir=tmp_path, warmup_steps=0)


class _Tokens:
    """Deterministic per epoch, 5 micro-batches: windows of 2, 2 and a partial 1."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.epoch)
        for _ in range(5):
            ids = torch.randint(0, 11, (3, 9), generator=gen)
            yield ids[:, :-1], ids[:, 1:]


def test_resume_is_bit_identical(tmp_path):
    straight = _gpt_trainer(tmp_path / "a")
    straight.fit(_Tokens(), 5)
    first = _gpt_trainer(tmp_path / "b")
    first.fit(_Tokens(), 2)
    first.save(tmp_path / "ckpt.pt")
    torch.manual_seed(123)  # disturb the RNG: the resume must restore it
    resumed = _gpt_trainer(tmp_path / "c")
    resumed.load(tmp_path / "ckpt.pt")
    resumed.fit(_Tokens(), 5)
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), f"{n} differs after resume"
    keys = ("loss", "grad_norm", "update_norm", "lr")
    assert [[r[k] for k in keys] for r in straight.history] == [[r[k] for k in keys] for r in resumed.history]
    assert [r["micro_batches"] for r in straight.history] == [2, 2, 1, 2, 2]  # a partial window, a new epoch
    logged = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert logged["steps"] == 5 and logged["saved_activation_bytes"] > 0
    assert (tmp_path / "a" / "train_log.csv").read_text().count("\n") == 6


def _loader_trainer(log_dir):
    torch.manual_seed(0)
    model = Net(hidden=(16, 16), dropout=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return Trainer(model, TokenLoss(), opt, accum_steps=2, warmup_steps=0, log_dir=log_dir)


def _loader(own_generator: bool, sampler_generator: bool = False):
    """A shuffling DataLoader of 7 micro-batches per epoch (windows of 2, 2, 2 and a partial 1)."""
    x, y = _batches([14], seed=5, dtype=torch.float32)[0]
    data = torch.utils.data.TensorDataset(x, y)
    if sampler_generator:
        sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(7))
        return torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler)
    generator = torch.Generator().manual_seed(3) if own_generator else None
    return torch.utils.data.DataLoader(data, batch_size=2, shuffle=True, generator=generator)


@pytest.mark.parametrize("generator", ["global RNG", "loader's generator", "sampler's generator"])
@pytest.mark.parametrize("save_at", [3, 4, 6])  # mid-epoch, after the epoch's last (partial) window, mid-epoch 2
def test_resume_with_a_shuffling_dataloader_is_bit_identical(tmp_path, generator, save_at):
    """The loader's order for the epoch and the position in it are restored: the resumed run sees
    the micro-batches the straight run saw, and its dropout draws the same masks."""
    def loader():
        return _loader(generator == "loader's generator", generator == "sampler's generator")

    straight = _loader_trainer(tmp_path / "a")
    straight.fit(loader(), 9)
    first = _loader_trainer(tmp_path / "b")
    first.fit(loader(), save_at)
    first.save(tmp_path / "ckpt.pt")
    torch.manual_seed(99)  # disturb everything the resume must restore
    resumed = _loader_trainer(tmp_path / "c")
    resumed.load(tmp_path / "ckpt.pt")
    resumed.fit(loader(), 9)
    keys = ("loss", "grad_norm", "micro_batches", "items")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in straight.history]
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), f"{n} differs after resume"
    assert straight.epoch == resumed.epoch == 2


def test_saving_mid_epoch_of_data_without_a_captured_order_warns(tmp_path):
    def batches():  # a generator: iterating it again does not give the same micro-batches
        yield from _batches([2, 3, 2, 1], dtype=torch.float32)

    class Once:
        def __iter__(self):
            return batches()

    trainer = _loader_trainer(tmp_path)
    trainer.accum_steps = 1
    trainer.fit(Once(), 2)
    with pytest.warns(UserWarning, match=r"Once, whose position cannot be captured, so a run resumed .* skips the 2"):
        trainer.save(tmp_path / "ckpt.pt")
    trainer = _loader_trainer(tmp_path)
    trainer.fit(_loader(True), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.save(tmp_path / "ckpt.pt")  # a DataLoader over a map-style dataset: nothing to say


def _small_trainer(hidden=(16, 16), seed=0, optimizer="AdamW"):
    """A Net with a mechgpu AdamW (or SGD with momentum) and a scheduler, after one step (so the
    optimizer has state)."""
    import mechgpu.optim as mo

    torch.manual_seed(seed)
    model = Net(hidden=hidden)
    opt = mo.AdamW(model.parameters(), lr=1e-2) if optimizer == "AdamW" else \
        mo.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = Trainer(model, TokenLoss(), opt, scheduler=sched, accum_steps=2, warmup_steps=0)
    trainer.fit(_batches([2, 3], seed=seed, dtype=torch.float32), 1)
    return trainer


def _snapshot(trainer):
    """Deep copies of everything ``load`` may change."""
    return copy.deepcopy({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                          "scheduler": trainer.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                          "counters": (trainer.step, trainer.epoch, trainer.position), "history": trainer.history})


def _assert_same(a, b, where="state"):
    """Bit-for-bit equality of nested dicts/lists/tensors, naming the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_load_round_trip_weights_only(tmp_path, monkeypatch):
    trainer = _small_trainer()
    np.random.seed(5)
    random.seed(5)
    path = tmp_path / "ckpt.pt"
    trainer.save(path)
    assert os.listdir(tmp_path) == ["ckpt.pt"], "a temporary file was left behind"
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), "the file should be created as open() would"
    saved = _snapshot(trainer)
    draws = (np.random.random(3).tolist(), random.random(), torch.rand(3))
    raw = torch.load(path, weights_only=True)  # no allow-listed globals needed for this version's files
    assert isinstance(raw["rng"]["numpy"]["keys"], torch.Tensor)

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    fresh = _small_trainer(hidden=(16, 16), seed=1)  # other weights, other optimizer state
    np.random.seed(0)
    random.seed(0)
    fresh.load(path)
    assert [k.get("weights_only") for k in loads] == [True]
    _assert_same(_snapshot(fresh), saved)
    assert (np.random.random(3).tolist(), random.random()) == draws[:2]
    assert torch.equal(torch.rand(3), draws[2])


class _Payload:
    """Unpickling this opens (so creates) ``marker`` for writing: arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_pickle_does_not_execute(tmp_path):
    trainer = _small_trainer()
    marker = tmp_path / "pwned"
    state = trainer.state_dict()
    state["history"] = [_Payload(marker)]
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    torch.load(path, weights_only=False)["history"][0].close()  # guard: the payload is live
    assert marker.exists()
    marker.unlink()
    before = _snapshot(trainer)
    with pytest.raises((pickle.UnpicklingError, RuntimeError)):
        trainer.load(path)
    assert not marker.exists(), "loading a checkpoint ran code from it"
    _assert_same(_snapshot(trainer), before)


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    trainer = _small_trainer()
    path = tmp_path / "ckpt.pt"
    trainer.save(path)
    good, saved = path.read_bytes(), _snapshot(trainer)
    trainer.fit(_batches([2, 3], dtype=torch.float32), 2)  # a later state, which the failed save must not leave

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"], "a temporary file was left behind"
    assert path.read_bytes() == good
    fresh = _small_trainer(seed=1)
    fresh.load(path)
    _assert_same(_snapshot(fresh)["model"], saved["model"])
    _assert_same(_snapshot(fresh)["optimizer"], saved["optimizer"])


def _wider_model(state):
    state.update(_small_trainer(hidden=(16, 24), seed=1).state_dict())


def _renamed_key(state):
    state["model"]["head.weight"] = state["model"].pop("out.weight")


def _other_optimizer(state):  # the model fits, the optimizer's state is for other shapes
    state["optimizer"] = _small_trainer(hidden=(16, 24), seed=1).optimizer.state_dict()


def _sgd_checkpoint(state):  # written by an SGD trainer of the same model
    state["optimizer"] = _small_trainer(seed=1, optimizer="SGD").optimizer.state_dict()


def _sgd_states(state):  # AdamW's groups, but the per-param states of SGD
    state["optimizer"]["state"] = _small_trainer(seed=1, optimizer="SGD").optimizer.state_dict()["state"]


def _meta_optimizer_state(state):
    entry = state["optimizer"]["state"][1]
    entry["exp_avg"] = torch.empty(entry["exp_avg"].shape, device="meta")


def _meta_model_tensor(state):
    state["model"]["out.bias"] = torch.empty(state["model"]["out.bias"].shape, device="meta")


@pytest.mark.parametrize("corrupt, message", [
    (_wider_model, r"'layers\.1\.up\.weight' has shape \(24, 8\) in the checkpoint but \(16, 8\)"),
    (_renamed_key, r"missing keys \['out\.weight'\], unexpected keys \['head\.weight'\]"),
    (_other_optimizer, r"optimizer state does not fit"),
    (_sgd_checkpoint, r"param group 0 lacks \['betas', 'eps'\], which AdamW needs"),
    (_sgd_states, r"param 0 of group 0 .*it has no \['step', 'exp_avg', 'exp_avg_sq'\] \(it has \['momentum_buffer'\]"),
    (_meta_optimizer_state, r"param 1 of group 0 .*'exp_avg' is a torch\.strided tensor on meta, with no data"),
    (_meta_model_tensor, r"model tensor 'out\.bias' is a torch\.strided tensor on meta in the checkpoint"),
    (lambda state: state.pop("optimizer"), r"lacks the keys \['optimizer'\]"),
    (lambda state: state["rng"].update(python=(3, (1, 2), None)), r"python RNG state cannot be restored"),
], ids=["wider_model", "renamed_key", "other_optimizer", "sgd_checkpoint", "sgd_states", "meta_optimizer_state",
        "meta_model_tensor", "no_optimizer", "bad_rng"])
def test_mismatched_checkpoint_raises_and_changes_nothing(tmp_path, corrupt, message):
    trainer = _small_trainer()
    state = _small_trainer(seed=1).state_dict()  # same shapes, other values: a load would show
    corrupt(state)
    path = tmp_path / "other.pt"
    torch.save(state, path)
    before = _snapshot(trainer)
    np_before, py_before = np.random.get_state(), random.getstate()
    with pytest.raises(ValueError, match=r"^Trainer\.load: ") as info:
        trainer.load(path)
    assert info.match(message)
    _assert_same(_snapshot(trainer), before)
    np_after = np.random.get_state()
    assert np.array_equal(np_after[1], np_before[1]) and np_after[2:] == np_before[2:]
    assert random.getstate() == py_before


def _rename_in_zip(path, old: bytes, new: bytes) -> None:
    """Rewrite a module name inside the pickle of a torch.save zip file."""
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            dst.writestr(info, data)
    path.write_bytes(out.getvalue())


@pytest.mark.parametrize("numpy_module", ["this", "other"])
def test_old_checkpoint_with_numpy_rng_array_loads(tmp_path, numpy_module):
    """The previous version pickled np.random.get_state() as is (an ndarray); with numpy 1.x its
    module is numpy.core, with 2.x numpy._core, and a file may come from either."""
    trainer = _small_trainer()
    np.random.seed(7)
    state = trainer.state_dict()
    state["rng"]["numpy"] = np.random.get_state()
    path = tmp_path / "old.pt"
    torch.save(state, path)
    if numpy_module == "other":  # as the other major version of numpy would have written it
        v2, v1 = b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct"
        _rename_in_zip(path, *((v2, v1) if int(np.__version__.split(".")[0]) >= 2 else (v1, v2)))
    with pytest.raises(pickle.UnpicklingError):  # guard: the ndarray needs the allow-list
        torch.load(path, weights_only=True)
    expected = np.random.random(4)
    np.random.seed(0)
    fresh = _small_trainer(seed=1)
    fresh.load(path)
    assert np.array_equal(np.random.random(4), expected)
    _assert_same(fresh.model.state_dict(), trainer.model.state_dict())


def test_logs_grad_norm_and_update_norm(tmp_path):
    trainer = _gpt_trainer(tmp_path, checkpoint="none")
    trainer.fit(_Tokens(), 2)
    for r in trainer.history:
        assert r["grad_norm"] > 0 and r["update_norm"] > 0 and r["items"] > 0


def _cli(*args, timeout=900):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "mechgpu", *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


TINY = ["--dim", "16", "--depth", "2", "--heads", "2", "--context", "8", "--device", "cpu"]


def test_train_command_smoke(tmp_path):
    out = _cli("train", *TINY, "--steps", "3", "--micro-batch", "2", "--accum-steps", "2", "--checkpoint", "all",
               "--no-progress", "--log-dir", str(tmp_path))
    assert "loss" in out and "tokens/s" in out and "saved activations" in out, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["saved_activation_bytes"] > 0
    # the optimizer's step-size telemetry, logged each step, printed and plotted
    assert "step size ||dp||/||p||" in out and (tmp_path / "telemetry.png").stat().st_size > 0, out
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all(r["update_ratio"] > 0 and r["param_norm"] > 0 and r["nonfinite_grads"] == 0
               and r["lost_update_fraction"] == 0 for r in rows), rows


def test_profile_command_smoke(tmp_path):
    png = tmp_path / "p.png"
    out = _cli("profile", *TINY, "--steps", "2", "--policies", "none", "all", "--accum", "1", "--micro", "2",
               "--plot", str(png))
    rows = [line for line in out.splitlines() if line.startswith(("mechgpu ", "torch "))]
    assert len(rows) == 3, out
    assert png.exists() and png.stat().st_size > 0
    runs = json.loads(png.with_suffix(".json").read_text())["runs"]
    none, full = (r for r in runs if r["implementation"] == "mechgpu")
    assert full["saved_bytes"] < none["saved_bytes"]


# ---------------------------------------------------------------------------- devices
class _Moved:
    """Any object with a ``.to``: records where it was sent."""

    def __init__(self):
        self.sent_to = []

    def to(self, device):
        self.sent_to.append(device)
        return self


def test_to_device_moves_tensors_through_every_container(monkeypatch):
    from collections import OrderedDict, namedtuple

    from transformers import BatchEncoding

    Pair = namedtuple("Pair", "inputs targets")
    other = _Moved()
    batch = (torch.ones(2), [Pair(torch.ones(1), torch.zeros(1, dtype=torch.long)), "text", 3],
             OrderedDict(a=torch.ones(3), b={"c": torch.ones(1)}), BatchEncoding({"input_ids": torch.ones(1, 2)}),
             other)
    sends = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: sends.append(k) or real_to(self, *a, **k))
    moved = to_device(batch, "meta")
    leaves = [moved[0], moved[1][0].inputs, moved[1][0].targets, moved[2]["a"], moved[2]["b"]["c"],
              moved[3]["input_ids"]]
    assert [t.device.type for t in leaves] == ["meta"] * 6
    assert type(moved) is tuple and type(moved[1]) is list and type(moved[1][0]) is Pair
    assert type(moved[2]) is OrderedDict and type(moved[3]) is BatchEncoding and moved[3].encodings is None
    assert moved[1][1:] == ["text", 3] and moved[4] is other and other.sent_to == ["meta"]
    assert batch[0].device.type == "cpu" and batch[3]["input_ids"].device.type == "cpu", "the batch itself changed"
    assert [k["non_blocking"] for k in sends] == [False] * 6
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)  # no pinned memory without an accelerator
    sends.clear()
    to_device(batch, "meta")
    assert [k["non_blocking"] for k in sends] == [True] * 6


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_the_trainer_moves_batches_to_its_models_device(kind):
    """A model on the meta device trains a step on CPU batches: without the move its forward raises."""
    class Keywords(Net):
        def forward(self, x, labels=None):
            return super().forward(x)

    model = Keywords().to("meta")
    x, y = _batches([2], dtype=torch.float32)[0]
    with pytest.raises(RuntimeError, match="meta"):
        model(x)
    batch = (x, y) if kind == "tuple" else {"x": x, "labels": y}
    trainer = Trainer(model, TokenLoss(), torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0)
    out = trainer.train_step([batch])
    assert out["loss"].device.type == "meta" and all(p.device.type == "meta" for p in model.parameters())
    assert trainer.last_global_items == int((y != -100).sum()), "counted on the batch as given"


# ---------------------------------------------------------------------------- HF-style dict batches
def _tiny_gpt2(cls_name="GPT2LMHeadModel", **config):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB_HF, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **config)
    return getattr(transformers, cls_name)(cfg)


VOCAB_HF, T_HF = 23, 7


def _hf_batches(sizes, seed=0):
    """Padded rows (attention_mask 0 and labels -100 at the end) and some other labels ignored."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        ids = torch.randint(0, VOCAB_HF, (b, T_HF), generator=gen)
        lengths = torch.randint(2, T_HF + 1, (b, 1), generator=gen)
        mask = (torch.arange(T_HF) < lengths).long()
        labels = ids.masked_fill(mask == 0, -100).masked_fill(torch.rand(b, T_HF, generator=gen) < 0.3, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.parametrize("container", ["dict", "BatchEncoding"])
def test_hf_dict_batches_accumulate_exactly_float64(container):
    """model(**batch) and its output.loss (a mean over the shifted labels it predicts) with no
    forward_fn, loss_fn or count_fn: three micro-batches give the grads and the loss of one
    (within float32's precision: HF's causal LM loss is float32). Counting the unshifted labels
    would weigh the micro-batches wrongly by several percent."""
    from transformers import BatchEncoding

    model = _tiny_gpt2().double()
    reference = copy.deepcopy(model)
    data = _hf_batches([2, 1, 3])
    wrap = BatchEncoding if container == "BatchEncoding" else dict
    opt = Recorder(model.parameters())
    trainer = Trainer(model, None, opt, accum_steps=3, track_update_norm=False, warmup_steps=0)
    trainer.fit([wrap(b) for b in data], steps=1)
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in data]  # the causal LM never predicts position 0
    assert [trainer.count_fn(b) for b in data] == counts and len(set(counts)) > 1
    full = {k: torch.cat([b[k] for b in data]) for k in data[0]}
    loss = reference(**full).loss
    loss.backward()
    for (name, p), g in zip(reference.named_parameters(), opt.grads[0]):  # HF's loss upcasts logits to float32
        _assert_rel(g, p.grad, 1e-6, name)
    assert abs(trainer.history[0]["loss"] - loss.item()) <= 1e-6 * loss.item()
    assert trainer.history[0]["samples"] == 6 and trainer.loss_reduction == "mean"


def test_hf_counts_follow_the_models_loss():
    """Unshifted labels for a model whose loss does not shift them; shift_labels where given; a
    batch without labels has no loss to train on."""
    classifier = _tiny_gpt2("GPT2ForSequenceClassification", num_labels=3, pad_token_id=0)
    trainer = Trainer(classifier, None, torch.optim.SGD(classifier.parameters(), lr=0.1))
    assert trainer.count_fn({"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.tensor([0, 2])}) == 2
    lm = _tiny_gpt2()
    trainer = Trainer(lm, None, torch.optim.SGD(lm.parameters(), lr=0.1))
    shift = torch.tensor([[1, 2, -100, -100]])
    assert trainer.count_fn({"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4),
                             "shift_labels": shift}) == 2
    with pytest.raises(ValueError, match=r"output has none \(an HF model computes it when the batch has 'labels'\)"):
        trainer.micro_batch_loss({"input_ids": torch.ones(1, 4, dtype=torch.long)}, count=1)


# ---------------------------------------------------------------------------- fp16 with GradScaler
def _fp16_data(device):
    """Four micro-batches; the third overflows float16 in the first layer (inf/NaN grads)."""
    data = _batches([2, 3, 2, 3], seed=4, dtype=torch.float32)
    data[2] = (data[2][0] * 1e5, data[2][1])
    return [(x.to(device), y.to(device)) for x, y in data]


def _fp16_reference(device, clip):
    """torch's own loop: autocast fp16, GradScaler, torch.optim.AdamW; per step the params, the
    unscaled grads' norm and the scale."""
    torch.manual_seed(0)
    model = Net().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler(device)
    steps = []
    for x, y in _fp16_data(device):
        with torch.autocast(device, dtype=torch.float16):
            loss = _mean_token_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        steps.append(([p.detach().clone() for p in model.parameters()], norm.item(), scaler.get_scale()))
    return steps


FP16_OPTIMIZERS = {  # (optimizer, the trainer's max_grad_norm, the clip torch's loop applies)
    "mechgpu AdamW clipping and unscaling in its kernel":
        (lambda ps: mo.AdamW(ps, lr=1e-2, max_grad_norm=1.0), None, 1.0),
    "mechgpu AdamW unscaling in its kernel": (lambda ps: mo.AdamW(ps, lr=1e-2), None, None),
    "torch AdamW, the trainer clipping": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), 1.0, 1.0),
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: fp16 autocast on the GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("name", list(FP16_OPTIMIZERS))
def test_fp16_steps_and_skips_as_torchs_grad_scaler(device, name):
    """Trainer(autocast="fp16") against torch's GradScaler loop, step by step: the params, the
    logged grad norm (of the unscaled grads), the scale, and the overflowing step skipped."""
    make, trainer_clip, clip = FP16_OPTIMIZERS[name]
    expected = _fp16_reference(device, clip)
    torch.manual_seed(0)
    model = Net().to(device)
    trainer = Trainer(model, _mean_token_loss, make(model.parameters()), autocast="fp16",
                      max_grad_norm=trainer_clip, loss_reduction="mean", warmup_steps=0)
    data = _fp16_data("cpu")  # moved by the trainer
    for step, (params, norm, scale) in enumerate(expected):
        trainer.fit(data, until_step=step + 1)
        for i, (p, e) in enumerate(zip(model.parameters(), params)):
            assert torch.allclose(p, e, rtol=1e-5, atol=1e-6), f"step {step} param {i}: {(p - e).abs().max():.3e}"
        logged = trainer.history[step]["grad_norm"]
        assert math.isfinite(logged) == math.isfinite(norm) and (not math.isfinite(norm) or
                                                                 abs(logged - norm) <= 1e-5 * norm), (logged, norm)
        assert trainer.scaler.get_scale() == scale
    assert [s for *_, s in expected] == [65536.0, 65536.0, 32768.0, 32768.0]
    assert all(torch.equal(a, b) for a, b in zip(expected[1][0], expected[2][0])), "the reference skipped no step"


def test_fp16_scaler_state_resumes(tmp_path):
    def trainer():
        torch.manual_seed(0)
        model = Net()
        return Trainer(model, TokenLoss(), mo.AdamW(model.parameters(), lr=1e-2), autocast="fp16", warmup_steps=0)

    data = _fp16_data("cpu")
    straight = trainer()
    straight.fit(data, steps=4)
    first = trainer()
    first.fit(data, steps=3)  # the third step overflowed: the scale halved
    first.save(tmp_path / "ckpt.pt")
    resumed = trainer()
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.scaler.state_dict() == first.scaler.state_dict() and resumed.scaler.get_scale() == 32768.0
    resumed.fit(data, steps=1)
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["scaler"] = {"scale": 1.0}
    with pytest.raises(ValueError, match="GradScaler state .* lacks some of"):
        resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="autocast must be None, 'bf16' or 'fp16', not 'fp8'"):
        Trainer(Net(), TokenLoss(), mo.AdamW(Net().parameters()), autocast="fp8")


# ---------------------------------------------------------------------------- fit: steps to run, step to reach
def test_fit_runs_steps_or_reaches_until_step():
    data = _batches([2, 3, 1], dtype=torch.float32)
    trainer = Trainer(Net(), TokenLoss(), torch.optim.SGD(Net().parameters(), lr=0.0), warmup_steps=0)
    trainer.fit(data, 2)  # positional: the step to reach
    assert trainer.step == 2
    trainer.fit(data, steps=2)  # steps to run now
    assert trainer.step == 4
    trainer.fit(data, until_step=5)
    assert trainer.step == 5
    trainer.fit(data, 3)  # already past it: nothing to run
    trainer.fit(data, steps=0)
    assert trainer.step == 5 and len(trainer.history) == 5
    for kwargs in ({}, {"until_step": 6, "steps": 1}):
        with pytest.raises(ValueError, match="exactly one of until_step"):
            trainer.fit(data, **kwargs)
    with pytest.raises(ValueError, match="steps must be an int >= 0, not -1"):
        trainer.fit(data, steps=-1)


def test_readme_training_block_runs_as_written():
    """The README's Hugging Face block in "Training": init_model, weight_decay_groups and the
    Trainer on the model's own loss, as written; it trains 3 steps and keeps the tie."""
    pytest.importorskip("transformers", reason="the README block uses transformers")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Training: `mechgpu.train`", 1)[1].split("\n## ", 1)[0]
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", section, re.S)
              if "GPT2LMHeadModel" in b]
    assert len(blocks) == 1, "README's Training section lost its Hugging Face block"
    ns: dict = {}
    exec(compile(blocks[0], "README.md Training block", "exec"), ns)
    model, trainer = ns["model"], ns["trainer"]
    assert trainer.step == 3 and model.lm_head.weight is model.transformer.wte.weight
    assert "transformer.wte" in ns["table"].tied.values()
    assert all(torch.isfinite(p).all() for p in model.parameters())
