"""Which 8-bit code for optimizer states: the measurement behind ``kernels/quant8.py``'s choice.

Every candidate is block-wise (one absmax per 256 elements, Dettmers et al. 2022) and differs
only in its 256-entry code book, simulated in float64 with torch (no kernel):

* ``dynamic``: bitsandbytes' dynamic tree map (signed for m, unsigned for v), as torchao's
  ``OptimState8bit`` builds it (``create_dynamic_map``); encoding is a binary search;
* ``e4m3``: an 8-bit float with 4 exponent and 3 mantissa bits and the sign bit, for m and for v
  (torchao's ``OptimStateFp8`` does this; the sign bit is wasted on v);
* ``e4m3+u4m4``: e4m3 for m, an unsigned float (4 exponent, 4 mantissa bits) for v;
* ``e4m3+u4m4(sqrt v)``: the same, storing sqrt(v), which Adam reads anyway (``mechgpu``'s choice).

Two figures per candidate:

1. the error of the Adam direction m / (sqrt(v) + eps) when real moments (from torch's AdamW
   on a teacher-student MLP, after 50 / 300 / 600 steps) are quantized once, relative to fp32;
2. the final loss of that training run when every step dequantizes, updates in fp32 and
   requantizes both moments (same seed, same data), against fp32 AdamW's; and the same with noisy targets
   (teacher + 0.3 std noise), whose loss has a floor as real data's has.

Run: ``python bench/quant8_scheme.py`` (CPU, several minutes a scheme; ``--no-train`` for the
direction errors alone, ``--only NAME`` for some schemes).

Measured here (2-core CPU, shared; 600 steps, one seed):

scheme                  dir err @50  @300   @600  final loss vs fp32  noisy target vs fp32
fp32                        0.0000  0.0000 0.0000    0.00642  +0.00%     0.00944  +0.00%
dynamic                     0.0155  0.0141 0.0136    0.00600  -6.61%     0.00871  -7.72%
dynamic/128                 0.0146  0.0132 0.0128    0.00607  -5.52%     0.00880  -6.77%
e4m3                        0.0293  0.0293 0.0292    0.00572 -10.89%     0.00820 -13.08%
e4m3+u4m4                   0.0270  0.0270 0.0269    0.00596  -7.20%     0.00861  -8.75%

and the direction errors alone (``--no-train``; the training runs of these were not finished):

e4m3+u4m4(sqrt v)           0.0292  0.0294 0.0294
e4m3+u4m4(sqrt v)/128       0.0292  0.0290 0.0290   <- mechgpu's (kernels/quant8.py)
e3m4+u4m4(sqrt v)/128       0.0186  0.0187 0.0186
e3m4+u3m5(sqrt v)/128       0.0146  0.0146 0.0144

Every 8-bit scheme ended within noise of fp32 here (lower, on one seed); the direction error
favours more mantissa bits, at the cost of range (see kernels/quant8.py).
"""

from __future__ import annotations

import math

import torch


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' dynamic tree map (``create_dynamic_map(signed, 7, 8)``), sorted, float64."""
    data = []
    non_sign_bits = 7
    exp_bits = 7
    for i in range(exp_bits):
        items = int(2 ** (i + non_sign_bits - exp_bits) + 1 if signed else 2 ** (i + non_sign_bits - exp_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float64)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(exp_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(exp_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float64)  # 256 values, 0 and 1 among them


def minifloat_map(exponent_bits: int, mantissa_bits: int, signed: bool) -> torch.Tensor:
    """Every value of an 8-bit float (subnormals, no inf/NaN, bias 2^e - 1) scaled so that its largest is 1."""
    bias = 2 ** exponent_bits - 1
    values = []
    for e in range(2 ** exponent_bits):
        for f in range(2 ** mantissa_bits):
            values.append(f * 2.0 ** (1 - bias - mantissa_bits) if e == 0
                          else (1 + f / 2 ** mantissa_bits) * 2.0 ** (e - bias))
    table = torch.tensor(values, dtype=torch.float64)
    table = table / table.max()
    if signed:
        table = torch.cat([-table.flip(0), table[1:]])
    return torch.unique(table)


def quantize(x: torch.Tensor, table: torch.Tensor, block: int) -> torch.Tensor:
    """x -> the nearest table value of x / absmax, times absmax, per block of ``block`` (float64)."""
    flat = x.double().reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True)
    y = blocks / absmax.clamp_min(1e-300)
    index = torch.searchsorted(table, y.contiguous()).clamp(1, len(table) - 1)
    lo, hi = table[index - 1], table[index]
    nearest = torch.where((y - lo) <= (hi - y), lo, hi)
    return (nearest * absmax).reshape(-1)[:flat.numel()].view_as(x).to(x.dtype)


#: name -> (code book of m, code book of v, v stored as sqrt(v), elements per absmax)
SCHEMES = {
    "fp32": None,
    "dynamic": (dynamic_map(True), dynamic_map(False), False, 256),
    "dynamic/128": (dynamic_map(True), dynamic_map(False), False, 128),
    "e4m3": (minifloat_map(4, 3, True), minifloat_map(4, 3, True), False, 256),
    "e4m3+u4m4": (minifloat_map(4, 3, True), minifloat_map(4, 4, False), False, 256),
    "e4m3+u4m4(sqrt v)": (minifloat_map(4, 3, True), minifloat_map(4, 4, False), True, 256),
    "e4m3+u4m4(sqrt v)/128": (minifloat_map(4, 3, True), minifloat_map(4, 4, False), True, 128),
    "e3m4+u4m4(sqrt v)/128": (minifloat_map(3, 4, True), minifloat_map(4, 4, False), True, 128),
    "e3m4+u3m5(sqrt v)/128": (minifloat_map(3, 4, True), minifloat_map(3, 5, False), True, 128),
}


def roundtrip(scheme, m: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if scheme is None:
        return m, v
    signed, unsigned, sqrt_v, block = scheme
    m = quantize(m, signed, block)
    v = quantize(v.sqrt(), unsigned, block).square() if sqrt_v else quantize(v, unsigned, block)
    return m, v


def problem(seed: int = 0, noise: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(64, 256, generator=gen) / 8, torch.randn(256, 256, generator=gen) / 16,
               torch.randn(256, 16, generator=gen) / 16]
    student = [torch.randn(64, 256, generator=gen) / 8, torch.randn(256, 256, generator=gen) / 16,
               torch.randn(256, 16, generator=gen) / 16]
    data = torch.randn(4096, 64, generator=gen)

    def forward(ws, x):
        for w in ws[:-1]:
            x = torch.nn.functional.gelu(x @ w)
        return x @ ws[-1]

    target = forward(teacher, data)
    target = target + noise * target.std() * torch.randn(target.shape, generator=gen)
    return student, data, target, forward


def train(scheme, steps: int = 600, snapshots=(50, 300, 600), lr: float = 2e-3, noise: float = 0.0):
    """AdamW written out (torch's formula), the moments passed through ``scheme`` after every step."""
    student, data, target, forward = problem(noise=noise)
    ws = [w.clone().requires_grad_() for w in student]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.01
    gen = torch.Generator().manual_seed(1)
    moments = {}
    loss = None
    for t in range(1, steps + 1):
        batch = torch.randint(0, data.shape[0], (256,), generator=gen)
        loss = torch.nn.functional.mse_loss(forward(ws, data[batch]), target[batch])
        grads = torch.autograd.grad(loss, ws)
        with torch.no_grad():
            for w, g, m, v in zip(ws, grads, ms, vs):
                w.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = v.sqrt() / math.sqrt(1 - b2 ** t) + eps
                w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                qm, qv = roundtrip(scheme, m, v)
                m.copy_(qm)
                v.copy_(qv)
        if t in snapshots:
            moments[t] = ([m.clone() for m in ms], [v.clone() for v in vs], t)
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(forward(ws, data), target).item()
    return final, moments


def direction_error(scheme, moments) -> float:
    """||u_q - u|| / ||u|| over every tensor, u = m_hat / (sqrt(v_hat) + eps)."""
    ms, vs, t = moments
    num = den = 0.0
    for m, v in zip(ms, vs):
        qm, qv = roundtrip(scheme, m.double(), v.double())
        u = (m.double() / (1 - 0.9 ** t)) / ((v.double() / (1 - 0.999 ** t)).sqrt() + 1e-8)
        uq = (qm / (1 - 0.9 ** t)) / ((qv / (1 - 0.999 ** t)).sqrt() + 1e-8)
        num += (uq - u).square().sum().item()
        den += u.square().sum().item()
    return math.sqrt(num / den)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="schemes whose name contains this (fp32 always runs)")
    parser.add_argument("--no-train", action="store_true", help="the direction errors only (fast)")
    args = parser.parse_args()
    torch.manual_seed(0)
    reference_loss, moments = train(None)
    noisy_reference = reference_loss if args.no_train else train(None, noise=0.3)[0]
    print(f"{'scheme':24s} {'dir err @50':>12s} {'@300':>8s} {'@600':>8s} {'final loss':>11s} {'vs fp32':>8s} "
          f"{'noisy target':>13s} {'vs fp32':>8s}", flush=True)
    for name, scheme in SCHEMES.items():
        if scheme is not None and args.only not in name:
            continue
        errors = [direction_error(scheme, moments[t]) if scheme else 0.0 for t in sorted(moments)]
        train_too = scheme is not None and not args.no_train
        loss = train(scheme)[0] if train_too else reference_loss
        noisy = train(scheme, noise=0.3)[0] if train_too else noisy_reference
        print(f"{name:24s} {errors[0]:12.4f} {errors[1]:8.4f} {errors[2]:8.4f} {loss:11.5f} "
              f"{100 * (loss / reference_loss - 1):+7.2f}% {noisy:13.5f} {100 * (noisy / noisy_reference - 1):+7.2f}%",
              flush=True)


if __name__ == "__main__":
    main()
