"""Trainer under two gloo ranks on CPU: DDP and FSDP2 give the single-process loss curve.

Each rank gets its half of every global micro-batch; the trainer skips the gradient
all-reduce on all but the last micro-batch of a window (DDP ``no_sync``, FSDP2
``set_requires_gradient_sync``), and normalises by the global token count. The single
process sees the same global micro-batches. The kernels run in triton's interpreter.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_interpreted

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch built without torch.distributed / gloo")

WORLD, STEPS, MICRO, ACCUM = 2, 3, 4, 2
TIMEOUT_S = 300


def _curve(kind: str | None, rank: int, world: int) -> dict:
    import mechgpu.optim as mo
    from mechgpu.tools.gpt import CharBatches, CharGPT, TokenLoss, init_gpt
    from mechgpu.tools.jobs import _wrap
    from mechgpu.train.trainer import Trainer

    torch.manual_seed(0)
    model = CharGPT(vocab=13, context=8, dim=16, depth=2, heads=2, dropout=0.0)
    init_gpt(model, 0)
    model = _wrap(model, kind, "cpu")
    opt = mo.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5)
    ids = torch.randint(0, 13, (500,), generator=torch.Generator().manual_seed(1))
    data = CharBatches(ids, MICRO // world, 8, batches=10**6, seed=0, rank=rank, world=world)
    trainer = Trainer(model, TokenLoss(), opt, accum_steps=ACCUM, warmup_steps=0)
    trainer.fit(data, STEPS)
    return {k: [r[k] for r in trainer.history] for k in ("loss", "grad_norm", "update_norm")}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=90))
        try:
            out = {kind: _curve(kind, rank, WORLD) for kind in ("ddp", "fsdp")}
        finally:
            dist.destroy_process_group()
        if rank == 0:  # the single-process reference, here so that it runs in the interpreter as the ranks do
            out["single"] = _curve(None, 0, 1)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_dist")
    failure = spawn_interpreted(_worker, (str(tmp / "init"), str(tmp)), WORLD, TIMEOUT_S)
    errors = "".join((tmp / f"rank{r}.err").read_text() for r in range(WORLD) if (tmp / f"rank{r}.err").exists())
    if failure or errors:
        pytest.fail(f"distributed trainer failed: {failure}\n{errors}", pytrace=False)
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return ranks, ranks[0]["single"]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_match_single_process(curves, kind):
    ranks, single = curves
    for rank, res in enumerate(ranks):
        for key in ("loss", "grad_norm", "update_norm"):
            torch.testing.assert_close(torch.tensor(res[kind][key]), torch.tensor(single[key]), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, key=key, rank=rank: f"{kind} rank {rank} {key}: {m}")
