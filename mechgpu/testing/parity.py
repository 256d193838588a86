"""Training parity of optimizer state precisions: a teacher-student MLP, shared by the tests
(tests/test_quant8.py, a short run) and the benchmark (bench/quant8_parity.py, longer runs)."""

from __future__ import annotations

import torch

import mechgpu.optim as mo


def _teacher_student(seed: int, device):
    gen = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(32, 128, generator=gen) / 5.7, torch.randn(128, 8, generator=gen) / 11.3]
    data = torch.randn(1024, 32, generator=gen)
    target = torch.tanh(data @ teacher[0]) @ teacher[1]
    target = target + 0.1 * target.std() * torch.randn(target.shape, generator=gen)
    student = [torch.randn(32, 128, generator=gen) / 5.7, torch.randn(128, 64, generator=gen) / 11.3,
               torch.randn(64, 8, generator=gen) / 8]
    return data.to(device), target.to(device), student


def parity_loss(optimizer: str | type, options: dict, steps: int, seed: int = 0, device="cpu") -> float:
    """Final full-data MSE of a 32-128-64-8 tanh MLP student fitting a noisy teacher (two of its
    three weights have >= 4,096 elements, so 8-bit states there). ``optimizer``: a class of
    ``mechgpu.optim`` by name, or any optimizer class (bitsandbytes', for the benchmark)."""
    data, target, student = _teacher_student(seed, device)
    ws = [w.to(device).requires_grad_() for w in student]
    opt = (getattr(mo, optimizer) if isinstance(optimizer, str) else optimizer)(ws, **options)
    gen = torch.Generator().manual_seed(seed + 1)

    def loss_of(x, y):
        h = x
        for w in ws[:-1]:
            h = torch.tanh(h @ w)
        return torch.nn.functional.mse_loss(h @ ws[-1], y)

    for _ in range(steps):
        batch = torch.randint(0, data.shape[0], (128,), generator=gen).to(device)
        opt.zero_grad()
        loss_of(data[batch], target[batch]).backward()
        opt.step()
    with torch.no_grad():
        return float(loss_of(data, target))


#: each optimizer's hyperparameters in the parity runs
PARITY = {"AdamW": {"lr": 3e-3, "weight_decay": 0.01}, "RMSprop": {"lr": 1e-3},
          "SGD": {"lr": 0.05, "momentum": 0.9}}
