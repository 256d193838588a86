"""Training parity of optimizer state precisions on two tasks, shared by the tests
(tests/test_quant8.py, short runs) and the benchmark (bench/quant8_parity.py, longer runs):

- ``"mlp"``: a 32-128-64-8 tanh MLP student fitting a noisy teacher; the loss is the final
  full-data MSE. Two of its three weights have >= 4,096 elements, so 8-bit states there.
- ``"gpt"``: the tour's character GPT (``mechgpu.tools.gpt``: 2 blocks of width 64, 4 heads,
  context 32) on stdlib source; the loss is the final mean cross-entropy per character on 8
  fixed held-out batches of 16 windows (``CharCorpus.val``). Its block matrices (4,096 to 16,384
  elements) and the embedding and head (vocab x 64) get 8-bit states; the position embedding
  (2,048) and the LayerNorm weights keep fp32.
"""

from __future__ import annotations

import functools

import torch

import mechgpu.optim as mo


def _mlp(seed: int, device):
    """(params, batch(gen), loss(params, batch), final loss) of the teacher-student MLP."""
    gen = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(32, 128, generator=gen) / 5.7, torch.randn(128, 8, generator=gen) / 11.3]
    data = torch.randn(1024, 32, generator=gen)
    target = torch.tanh(data @ teacher[0]) @ teacher[1]
    target = target + 0.1 * target.std() * torch.randn(target.shape, generator=gen)
    student = [torch.randn(32, 128, generator=gen) / 5.7, torch.randn(128, 64, generator=gen) / 11.3,
               torch.randn(64, 8, generator=gen) / 8]
    data, target = data.to(device), target.to(device)
    ws = [w.to(device).requires_grad_() for w in student]

    def loss_of(x, y):
        h = x
        for w in ws[:-1]:
            h = torch.tanh(h @ w)
        return torch.nn.functional.mse_loss(h @ ws[-1], y)

    def batch(gen):
        rows = torch.randint(0, data.shape[0], (128,), generator=gen).to(device)
        return data[rows], target[rows]

    return ws, batch, loss_of, lambda: loss_of(data, target)


@functools.lru_cache(maxsize=1)
def _corpus():
    from mechgpu.tools.gpt import CharCorpus

    return CharCorpus(max_chars=200_000)


def _gpt(seed: int, device):
    """(params, batch(gen), loss(inputs, targets), held-out loss) of the tour's character GPT."""
    from mechgpu.tools.gpt import CharBatches, CharGPT, TokenLoss, init_gpt

    corpus, context, batch_size = _corpus(), 32, 16
    with torch.random.fork_rng(devices=[]):  # CharGPT's default init draws from the global generator
        torch.manual_seed(seed)
        model = CharGPT(corpus.vocab, context=context, dim=64, depth=2, heads=4, torch_baseline=True).to(device)
        init_gpt(model, seed)
    token_loss = TokenLoss()
    held_out = list(CharBatches(corpus.val, batch_size, context, batches=8, seed=seed + 2, device=device))

    def loss_of(x, y):
        return token_loss(model(x), y) / y.numel()

    def batch(gen):
        starts = torch.randint(0, len(corpus.train) - context - 1, (batch_size,), generator=gen)
        window = corpus.train[starts[:, None] + torch.arange(context + 1)].to(device)
        return window[:, :-1], window[:, 1:]

    def final():
        return sum(loss_of(x, y) for x, y in held_out) / len(held_out)

    return list(model.parameters()), batch, loss_of, final


TASKS = {"mlp": _mlp, "gpt": _gpt}


def parity_loss(optimizer: str | type, options: dict, steps: int, seed: int = 0, device="cpu",
                task: str = "mlp") -> float:
    """Final loss of ``task`` (a key of ``TASKS``; see the module docstring for each task's loss)
    after ``steps`` steps of ``optimizer(params, **options)``: a class of ``mechgpu.optim`` by
    name, or any optimizer class (bitsandbytes', for the benchmark)."""
    params, batch, loss_of, final = TASKS[task](seed, device)
    opt = (getattr(mo, optimizer) if isinstance(optimizer, str) else optimizer)(params, **options)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(*batch(gen)).backward()
        opt.step()
    with torch.no_grad():
        return float(final())


#: each task's optimizers and their hyperparameters in the parity runs
PARITY = {
    "mlp": {"AdamW": {"lr": 3e-3, "weight_decay": 0.01}, "RMSprop": {"lr": 1e-3},
            "SGD": {"lr": 0.05, "momentum": 0.9}},
    "gpt": {"AdamW": {"lr": 3e-3, "weight_decay": 0.01}, "RMSprop": {"lr": 1e-3},
            "SGD": {"lr": 0.3, "momentum": 0.9}},
}
