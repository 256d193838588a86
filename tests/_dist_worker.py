"""Worker processes for test_distributed.py: two gloo ranks on CPU running every scenario.

Each rank trains the same tiny model three times from the same init and data (its own shard
of every batch): (a) torch.optim + torch.nn.utils.clip_grad_norm_, (b) mechgpu.optim +
mechgpu.clip.clip_grad_norm_, (c) mechgpu.optim with max_grad_norm (clipping fused into the
step). It records losses, norms, the norms of every rank (all-gathered), final full params,
clipped grads and optimizer states, and torch.save's them for the parent test to compare.
In the 8-bit scenarios (EIGHT_BIT) mechgpu's runs keep ``state_dtype="8bit"`` (torch's stays
fp32: it has no 8-bit states), the model is MODEL_8BIT, and a fourth run, (d) ``single_8bit``,
trains the unsharded model on the whole batch in one process, with no process group: the
8-bit result FSDP2 must reproduce.
Under FSDP2 each run also calls ``model.float()`` after its second step: Module._apply then swaps
every DTensor param and grad with torch.utils.swap_tensors, as FSDP2 users' conversions do.

``run`` sets TRITON_INTERPRET=1 before it imports triton (nothing imported here does), so
the mechgpu kernels run in triton's interpreter on the CPU tensors whatever the parent's
environment; importing this module in the parent changes nothing there.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

WORLD_SIZE = 2
STEPS = 4
GLOBAL_BATCH = 8
IN_FEATURES = 16
VARIANTS = ("torch", "mechgpu_clip", "mechgpu_fused")
SINGLE = "single_8bit"

# name -> (wrapper, optimizer, optimizer kwargs, max_norm)
SCENARIOS = {
    "fsdp_adamw": ("fsdp", "AdamW", {"lr": 1e-2, "weight_decay": 0.1}, 0.05),
    "fsdp_sgd": ("fsdp", "SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, 0.05),
    "ddp_adamw": ("ddp", "AdamW", {"lr": 1e-2, "weight_decay": 0.1}, 0.05),
    # grads as views into DDP's flat buckets: shared storage, 4 of 6 at unaligned offsets
    "ddp_sgd_bucket_view": ("ddp", "SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, 0.05),
    "fsdp_adamw_8bit": ("fsdp", "AdamW", {"lr": 1e-2, "weight_decay": 0.1}, 0.05),
}
#: the scenarios whose mechgpu runs keep 8-bit states
EIGHT_BIT = ("fsdp_adamw_8bit",)
#: (in, out) of MODEL_8BIT's Linear layers. FSDP2 shards a weight's rows, ceil(out / 2) of them on
#: rank 0. Global and local element counts of the weights, against MIN_8BIT_NUMEL = 4096:
#: 128 x 16 = 2,048 (fp32 states); 63 x 128 = 8,064, shards 4,096 / 3,968: the threshold
#: applies to the global numel (below it, rank 1's shard alone would keep fp32 states);
#: 64 x 63 = 4,032 (fp32); 128 x 64 = 8,192, shards 4,096 / 4,096; the head 1 x 128 (rank 1
#: empty). Every 8-bit shard starts at a multiple of QUANT_BLOCK = 128 of its weight, so its
#: blocks are the unsharded weight's: the single-process run quantizes the same blocks.
MODEL_8BIT = ((IN_FEATURES, 128), (128, 63), (63, 64), (64, 128), (128, 1))


def make_model_8bit() -> torch.nn.Module:
    """MODEL_8BIT's Linear layers with tanh between them (~22.8k params)."""
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in MODEL_8BIT:
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def variants(scenario: str) -> tuple[str, ...]:
    return (*VARIANTS, SINGLE) if scenario in EIGHT_BIT else VARIANTS


def make_model() -> torch.nn.Module:
    """~1.4k params. The odd width gives uneven FSDP shards (33 rows -> 17/16) and, with DDP's
    gradient_as_bucket_view, grads at offsets that are not 16-byte aligned (4 mod 16); the
    1-wide head leaves FSDP rank 1 with empty (0-element) shards of its weight and bias."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, 33), torch.nn.Tanh(),
        torch.nn.Linear(33, 24), torch.nn.Tanh(),
        torch.nn.Linear(24, 1),
    )


def batch(step: int, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of the global batch of ``step`` (same global batch on every rank); the
    whole batch for ``rank=None``."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=gen)
    y = 3.0 * torch.randn(GLOBAL_BATCH, 1, generator=gen)  # large targets: large grads, so clipping bites
    if rank is None:
        return x, y
    shard = GLOBAL_BATCH // WORLD_SIZE
    return x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t):
    """A plain tensor holding the full value of a DTensor (or of a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().clone()


def wrap(model: torch.nn.Module, wrapper: str, bucket_view: bool) -> torch.nn.Module:
    if wrapper == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)


def make_optimizer(variant: str, name: str, kwargs: dict, max_norm: float, params, eight_bit: bool = False):
    if variant == "torch":
        return getattr(torch.optim, name)(params, **kwargs)
    import mechgpu.optim

    extra = {"max_grad_norm": max_norm} if variant in ("mechgpu_fused", SINGLE) else {}
    if eight_bit:
        extra["state_dtype"] = "8bit"
    return getattr(mechgpu.optim, name)(params, **kwargs, **extra)


def train(rank: int, scenario: str, variant: str) -> dict:
    import mechgpu.clip

    wrapper, opt_name, opt_kwargs, max_norm = SCENARIOS[scenario]
    eight_bit, single = scenario in EIGHT_BIT, variant == SINGLE
    model = make_model_8bit() if eight_bit else make_model()
    if not single:
        model = wrap(model, wrapper, bucket_view=scenario.endswith("bucket_view"))
    params = list(model.parameters())
    opt = make_optimizer(variant, opt_name, opt_kwargs, max_norm, params, eight_bit and variant != "torch")
    out = {"losses": [], "global_losses": [], "norms": [], "norms_all_ranks": [], "norm_types": [],
           "param_types": sorted({type(p).__name__ for p in params}),
           "local_numels": [p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params]}
    resume = eight_bit and variant == "mechgpu_fused"
    for step in range(STEPS):
        if resume and step == STEPS - 1:  # each rank's state_dict and param shards, before the last step
            saved = copy.deepcopy(opt.state_dict()), [local(p).detach().clone() for p in params]
        x, y = batch(step, None if single else rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if variant == "torch":
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        elif variant == "mechgpu_clip":
            norm = mechgpu.clip.clip_grad_norm_(params, max_norm)
        if variant in ("torch", "mechgpu_clip"):
            out["norm_types"].append(type(norm).__name__)
            out["clipped_grads"] = [full(p.grad) for p in params]  # after clipping, before the step
        opt.step()
        if wrapper == "fsdp" and step == 1:  # no change of values, but Module._apply swaps every DTensor
            model.float()  # param and grad (swap_tensors), which refuses a tensor anything holds a weakref to
        if variant in ("mechgpu_fused", SINGLE):
            norm = opt.last_grad_norm
            out["norm_types"].append(type(norm).__name__)
        norm = full(norm).float().reshape(())
        out["losses"].append(loss.detach().clone())
        opt.zero_grad()
        if single:  # no process group: the whole batch's loss is the global loss
            out["norms"].append(norm)
            out["global_losses"].append(loss.detach().clone())
            continue
        gathered = [torch.zeros(()) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, norm)
        out["norms"].append(norm)
        out["norms_all_ranks"].append(torch.stack(gathered))
        global_loss = out["losses"][-1].clone()
        dist.all_reduce(global_loss)
        out["global_losses"].append(global_loss / WORLD_SIZE)
    if resume:  # a fresh optimizer loads this rank's state_dict and retakes the last step: bit for bit
        finished = [local(p).detach().clone() for p in params]
        with torch.no_grad():
            for p, shard in zip(params, saved[1]):
                local(p).copy_(shard)
        again = make_optimizer(variant, opt_name, opt_kwargs, max_norm, params, True)
        again.load_state_dict(saved[0])
        x, y = batch(STEPS - 1, rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        again.step()
        out["resumed_equal"] = [torch.equal(local(p), f) for p, f in zip(params, finished)]
    out["params"] = [full(p) for p in params]
    # per param and state: its dtype and the local numel (8-bit codes are the local shard's, plain tensors)
    out["state_layout"] = {i: {k: (str(v.dtype), type(v).__name__, int(v.numel()) if not hasattr(v, "to_local")
                                   else int(v.to_local().numel()))
                               for k, v in opt.state[p].items() if k != "step"} for i, p in enumerate(params)}
    if eight_bit and variant != "torch":
        out["states"] = {}  # 8-bit codes: compared through the params they move
        return out
    out["states"] = {i: {k: full(v) for k, v in opt.state[p].items() if k != "step"}
                     for i, p in enumerate(params)}
    return out


def run(rank: int, scenarios: list[str], init_file: str, out_dir: str) -> None:
    """torch.multiprocessing entry point: the scenarios in order on one process group.

    Results go to out_dir/<scenario>_rank<r>.pt. The first failure writes its traceback to
    out_dir/<scenario>_rank<r>.err (or setup_rank<r>.err) and is re-raised, which ends this
    rank (and makes torch.multiprocessing stop the other): later scenarios do not run.
    """
    torch.set_num_threads(1)
    label = "setup"
    try:
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        from mechgpu import _backend

        assert _backend.INTERPRETED, (
            "mechgpu's kernels are not running in triton's interpreter in the worker: triton was "
            "imported before TRITON_INTERPRET=1 was set, so the CPU steps would silently fall back "
            "to torch.optim and this test would compare torch with itself")
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD_SIZE, timeout=timedelta(seconds=90))
        try:
            for label in scenarios:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    results = {variant: train(rank, label, variant) for variant in variants(label)}
                results["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
                torch.save(results, os.path.join(out_dir, f"{label}_rank{rank}.pt"))
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"{label}_rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
