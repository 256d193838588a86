"""A small GPT-style character-level transformer and its corpus (stdlib source, no download).

Built from mechgpu's pieces where they exist: ``mechgpu.nn.GELU`` in the MLP (torch's
when ``torch_baseline=True`` or mechgpu.nn is absent), ``mechgpu.init.init_model`` for the
Linear weights. The blocks sit in ``model.blocks`` (a ModuleList), which is what the
trainer checkpoints.
"""

from __future__ import annotations

import math
import os
import sysconfig

import torch
from torch import nn
from torch.nn import functional as F

from .._backend import mixed_seed


def _gelu(torch_baseline: bool) -> nn.Module:
    if not torch_baseline:
        try:
            from ..nn import GELU

            return GELU()
        except ImportError:
            pass
    return nn.GELU()


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP, with dropout.
    No biases (as nanoGPT's bias=False): fewer tensors, which is what an interpreted
    multi-tensor step pays for on CPU."""

    def __init__(self, dim: int, heads: int, dropout: float, torch_baseline: bool) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), _gelu(torch_baseline),
                                 nn.Linear(4 * dim, dim, bias=False),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, context: int = 64, dim: int = 64, depth: int = 4, heads: int = 4,
                 dropout: float = 0.0, torch_baseline: bool = False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(dim, heads, dropout, torch_baseline) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def init_gpt(model: CharGPT, seed: int) -> None:
    """mechgpu.init's rules for the Linear layers (falls back to torch's where it cannot run)."""
    try:
        from ..init import init_model

        init_model(model, generator=torch.Generator(device=model.head.weight.device).manual_seed(seed))
    except Exception as exc:  # noqa: BLE001 - init is a nicety; the model trains either way
        import warnings

        warnings.warn(f"mechgpu.init.init_model failed ({exc}); keeping torch's init", stacklevel=2)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    with torch.no_grad():  # residual projections scaled down by depth (GPT-2)
        for block in model.blocks:
            block.proj.weight.mul_(1 / math.sqrt(2 * len(model.blocks)))
            block.mlp[2].weight.mul_(1 / math.sqrt(2 * len(model.blocks)))


STDLIB_FILES = ("argparse.py", "inspect.py", "typing.py", "dataclasses.py", "functools.py")


def stdlib_text(max_chars: int = 400_000) -> str:
    """Source text of a few standard-library modules, as found on this machine."""
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in STDLIB_FILES:
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
    text = "\n".join(parts)
    if not text:
        raise RuntimeError(f"no standard-library source found under {root}")
    return text[:max_chars]


class CharCorpus:
    """Character ids of stdlib source; ``train`` and ``val`` are the first 90% and the rest."""

    def __init__(self, max_chars: int = 400_000) -> None:
        text = stdlib_text(max_chars)
        self.chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(ids))
        self.train, self.val = ids[:cut], ids[cut:]

    @property
    def vocab(self) -> int:
        return len(self.chars)


class CharBatches:
    """``batches`` micro-batches of ``(inputs, targets)``: random windows of ``ids``, drawn from a
    generator seeded by (seed, epoch), so an epoch replays identically (resume relies on it).
    Pass ``world``/``rank`` to give each rank its own slice of every micro-batch."""

    def __init__(self, ids: torch.Tensor, batch: int, context: int, batches: int, seed: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world: int = 1) -> None:
        self.ids, self.batch, self.context, self.batches = ids, batch, context, batches
        self.seed, self.device, self.rank, self.world = seed, device, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        gen = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch))
        offsets = torch.arange(self.context + 1)
        for _ in range(self.batches):
            starts = torch.randint(0, len(self.ids) - self.context - 1, (self.batch * self.world,), generator=gen)
            starts = starts[self.rank * self.batch:(self.rank + 1) * self.batch]
            window = self.ids[starts[:, None] + offsets]
            yield window[:, :-1].to(self.device), window[:, 1:].to(self.device)


class TokenLoss(nn.Module):
    """Summed cross-entropy over every token of (B, T, V) logits."""

    reduction = "sum"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
