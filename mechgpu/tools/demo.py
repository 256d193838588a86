"""``mechgpu demo``: each mechgpu optimizer against its torch.optim twin on a real task.

The task is next-character prediction on the Python standard library's own source code
(present on every machine, no download) with a small MLP. Both optimizers of a pair start
from the same weights and see the same batches; the table shows the final loss of each,
the largest parameter difference after the last step, and the time per step.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .gpt import stdlib_text

CONTEXT = 8


class CharMLP(nn.Module):
    """Embeds CONTEXT characters, then a two-layer MLP predicts the next one."""

    def __init__(self, vocab: int, embed: int = 24, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.net = nn.Sequential(nn.Linear(CONTEXT * embed, hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, vocab))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(idx).flatten(1))


#: A row's label and torch options, tuned for this task, by optimizer; an optimizer not named
#: here runs under its own name with torch's defaults
TUNED = {
    "Adam": ("Adam", dict(lr=3e-3)),
    "AdamW": ("AdamW amsgrad", dict(lr=3e-3, weight_decay=0.05, amsgrad=True)),
    "RMSprop": ("RMSprop centered", dict(lr=1e-3, centered=True, momentum=0.5)),
    "SGD": ("SGD nesterov", dict(lr=0.1, momentum=0.9, nesterov=True)),
    "Adagrad": ("Adagrad lr_decay", dict(lr=3e-2, lr_decay=1e-3)),
}


def _optimizer_pairs():
    """(label, mechgpu class, torch class, options) for every optimizer mechgpu steps (``SPECS``)."""
    import mechgpu.optim as mo

    from ..kernels.optim_spec import SPECS

    pairs = []
    for name, spec in SPECS.items():
        label, options = TUNED.get(name, (name, {}))
        pairs.append((label, getattr(mo, name), spec.torch_class, options))
    return pairs


def _train(model, optimizer, batches, device):
    loss_fn = nn.CrossEntropyLoss()
    times = []
    loss = torch.tensor(float("nan"))
    for x, y in batches:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:] or times)  # the first step includes compilation
    return loss.item(), 1e3 * times[len(times) // 2]


def run_demo(steps: int, batch: int, device: str, seed: int) -> int:
    text = stdlib_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - CONTEXT - 1, (steps, batch), generator=gen)
    windows = torch.arange(CONTEXT)
    batches = [(data[s[:, None] + windows].to(device), data[s + CONTEXT].to(device)) for s in starts]

    torch.manual_seed(seed)
    init = CharMLP(len(chars)).to(device)
    n_params = sum(p.numel() for p in init.parameters())
    mode = "CUDA" if device == "cuda" else "CPU, Triton kernels in the interpreter (times are not GPU speeds)"
    print(f"mechgpu demo: next-character MLP on {len(text):,} characters of stdlib source, "
          f"{n_params:,} params in {len(list(init.parameters()))} tensors, {steps} steps of {batch}")
    print(f"device: {mode}\n")
    header = f"{'optimizer':<18} {'mechgpu loss':>12} {'torch loss':>11} {'max |Δparam|':>13} " \
             f"{'mechgpu ms/step':>16} {'torch ms/step':>14}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, ours_cls, torch_cls, kwargs in _optimizer_pairs():
        ours_model, torch_model = CharMLP(len(chars)).to(device), CharMLP(len(chars)).to(device)
        ours_model.load_state_dict(init.state_dict())
        torch_model.load_state_dict(init.state_dict())
        ours_loss, ours_ms = _train(ours_model, ours_cls(ours_model.parameters(), **kwargs), batches, device)
        torch_loss, torch_ms = _train(torch_model, torch_cls(torch_model.parameters(), **kwargs), batches, device)
        diff = max((a - b).abs().max().item() for a, b in zip(ours_model.parameters(), torch_model.parameters()))
        worst = max(worst, diff)
        print(f"{name:<18} {ours_loss:>12.4f} {torch_loss:>11.4f} {diff:>13.2e} {ours_ms:>16.2f} {torch_ms:>14.2f}")
    first_loss = nn.CrossEntropyLoss()(init(batches[0][0]), batches[0][1]).item()
    print(f"\nloss at step 0: {first_loss:.4f}; largest parameter difference from torch.optim: {worst:.2e}")
    return 0
