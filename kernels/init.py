"""Random fills for weight initialisation: uniform, normal and truncated normal, from Philox.

Where the random bits come from
-------------------------------
Element ``j`` of a fill takes 32-bit word ``j % 4`` of

    Philox4x32-10(key = seed, counter = (j // 4 mod 2^32, j // 4 >> 32, stream, 0))

(triton's ``tl.philox``). One Philox call therefore feeds four neighbouring elements, one
128-bit fp32 store. The value of an element depends only on ``(seed, stream, j)``: not on
the block size, the grid or the other tensors of a launch. A single-tensor fill uses
stream 0 with a fresh seed per call; a multi-tensor launch uses one seed and gives
tensor ``t`` stream ``t``, so its tensors read disjoint counter ranges of one key, which
is what makes Philox streams independent.

The math (fp32)
---------------
* uniform on [lo, hi), one word ``r`` per element: ``u = (r >> 8) 2^-24`` (24 bits, exact
  in fp32); ``x = lo + u (hi - lo)``; a value that rounds to ``hi`` in the tensor's dtype
  becomes ``lo`` (torch's CUDA rule), so stored values lie in [lo, hi).
* normal, two words per two elements, by Box-Muller: ``R = sqrt(-2 log u)`` with
  ``u = (r0 + 1/2) 2^-32`` (so ``|z| <= 6.77``), an angle of ``2 pi t`` turns with
  ``t = (r1 >> 8) 2^-24 - 1/2``, ``z = (R cos, R sin)``; sin and cos are polynomials on a
  quarter turn (core ``tl`` ops, no libdevice, so the interpreter runs the GPU's code).
  ``x = loc + scale z``.
* truncated normal, one word per element, by inversion: the top bit of ``r`` picks an end
  of the interval [alpha, beta] (in units of std), the other 31 bits give
  ``t = (r mod 2^31 + 1/2) 2^-32`` in (0, 1/2], and ``z = Phi^-1(Phi(alpha) + t m)`` from
  the lower end or ``z = -Phi^-1(Phi(-beta) + t m)`` from the upper one, with
  ``m = Phi(beta) - Phi(alpha)`` the mass of the interval. Measuring each half of the
  draws from its own end keeps the argument of ``Phi^-1`` a tail probability with full
  relative precision, so one-sided intervals far in a tail are exact and both tails of a
  wide interval reach 6.3 std. ``Phi^-1`` is Wichura's AS241 PPND7 (relative error about
  1e-7). Then ``x = clamp(loc + scale z, lo, hi)``.
* constant: ``x = loc`` (biases).

The host computes ``Phi`` at the interval's ends in float64 (``Fill.trunc_normal``) and
mirrors the interval (negating the scale) so that alpha + beta <= 0.
The values are stored in the tensor's dtype (fp32, bf16 or fp16), rounded to nearest even
(``rounding.round_like``: the same bits on a GPU and in triton's interpreter).

Memory: a fill reads nothing per element and writes the tensor once, so it moves
4 B (fp32) or 2 B (bf16, fp16) per element. Full blocks take an unmasked path; with
16-byte aligned tensors the stores are 128-bit.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import TL_DTYPES, device_guard, fill_block, fill_warps
from .multi_tensor import MultiTensorPlan, TableLayout
from .rounding import round_like

KIND_UNIFORM, KIND_NORMAL, KIND_TRUNC_NORMAL, KIND_CONSTANT = range(4)  # a fill's KIND
_KIND_UNIFORM = tl.constexpr(KIND_UNIFORM)
_KIND_NORMAL = tl.constexpr(KIND_NORMAL)
_KIND_TRUNC_NORMAL = tl.constexpr(KIND_TRUNC_NORMAL)
_KIND_CONSTANT = tl.constexpr(KIND_CONSTANT)

# Random integers to floats: k bits times 2^-k is uniform on [0, 1) (exact in fp32 for k = 24);
# adding 0.5 first keeps it off 0.
_TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)
_TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)

#: The table of a multi-tensor fill: one row per tensor, two fp32 parameters packed per column.
TABLE = TableLayout("ptr", "stream", "loc_scale", "lo_hi", "cdf_lo_sf_hi", "cdf_hi_mass", "numel", "kind")
(_COL_PTR, _COL_STREAM, _COL_LOC_SCALE, _COL_LO_HI, _COL_CDF_LO_SF_HI, _COL_CDF_HI_MASS, _COL_NUMEL,
 _COL_KIND) = TABLE.constexprs("ptr", "stream", "loc_scale", "lo_hi", "cdf_lo_sf_hi", "cdf_hi_mass", "numel", "kind")
_NCOL = tl.constexpr(TABLE.width)


# ----------------------------------------------------------------------------------
# math: one 32-bit random word in, one fp32 value out
# ----------------------------------------------------------------------------------
@triton.jit
def normal_ppf(p, pc):
    """Phi^-1(p) for p in (0, 1), given p and pc = 1 - p (Wichura 1988, AS241 PPND7).

    |p - 1/2| <= 0.425: q N(r) / D(r), r = 0.180625 - q^2, q = p - 1/2. Otherwise, with
    s = sqrt(-log(min(p, pc))), +-N(x) / D(x) for x = s - 1.6 (s <= 5) or x = s - 5, the
    sign of q. The three rational functions share one evaluation (the coefficients are
    selected first), so there is one division. Passing pc separately lets the caller give
    the upper tail with full relative precision. Relative error about 1e-7; min(p, pc) is
    floored at 1e-37.
    """
    q = p - 0.5
    central = tl.abs(q) <= 0.425
    s = tl.sqrt(-tl.log(tl.maximum(tl.minimum(p, pc), 1e-37)))
    near = s <= 5.0
    x = tl.where(central, 0.180625 - q * q, tl.where(near, s - 1.6, s - 5.0))
    n3 = tl.where(central, 59.109374720, tl.where(near, 0.17023821103, 0.017337203997))
    n2 = tl.where(central, 159.29113202, tl.where(near, 1.3067284816, 0.42868294337))
    n1 = tl.where(central, 50.434271938, tl.where(near, 2.7568153900, 3.0812263860))
    n0 = tl.where(central, 3.3871327179, tl.where(near, 1.4234372777, 6.6579051150))
    d3 = tl.where(central, 67.187563600, 0.0)
    d2 = tl.where(central, 78.757757664, tl.where(near, 0.12021132975, 0.012258202635))
    d1 = tl.where(central, 17.895169469, tl.where(near, 0.73700164250, 0.24197894225))
    factor = tl.where(central, q, tl.where(q < 0.0, -1.0, 1.0))
    return factor * (((n3 * x + n2) * x + n1) * x + n0) / (((d3 * x + d2) * x + d1) * x + 1.0)


@triton.jit
def uniform_from_bits(r, lo, hi, out_ptr):
    """x = lo + u (hi - lo), u = (r >> 8) 2^-24 in [0, 1); x -> lo where x rounds to hi in
    out_ptr's element type (torch's CUDA rule, so stored values lie in [lo, hi))."""
    u = (r >> 8).to(tl.float32) * _TWO_POW_M24
    x = lo + u * (hi - lo)
    hi_rounded = round_like(tl.cast(hi, tl.float32), out_ptr).to(tl.float32)
    return tl.where(round_like(x, out_ptr).to(tl.float32) >= hi_rounded, lo, x)


@triton.jit
def _sincos_turns(t):
    """(sin 2 pi t, cos 2 pi t) for t in [-1/2, 1/2): Taylor polynomials on [-pi/4, pi/4]
    (error below 3e-8) and the nearest quarter turn k: sin(a + k pi/2) is sin a, cos a,
    -sin a or -cos a."""
    k = (4.0 * t + 2.5).to(tl.int32) - 2  # floor(4 t + 1/2), in -2..2
    a = (t - 0.25 * k.to(tl.float32)) * 6.283185307179586
    a2 = a * a
    sin_a = a + a * a2 * (-1.6666666666666666e-01 + a2 * (8.3333333333333332e-03 + a2 * (
        -1.9841269841269841e-04 + a2 * 2.7557319223985893e-06)))
    cos_a = 1.0 + a2 * (-0.5 + a2 * (4.1666666666666664e-02 + a2 * (
        -1.3888888888888889e-03 + a2 * 2.4801587301587302e-05)))
    quadrant = k & 3
    sin_t = tl.where(quadrant == 0, sin_a, tl.where(quadrant == 1, cos_a, tl.where(quadrant == 2, -sin_a, -cos_a)))
    cos_t = tl.where(quadrant == 0, cos_a, tl.where(quadrant == 1, -sin_a, tl.where(quadrant == 2, -cos_a, sin_a)))
    return sin_t, cos_t


@triton.jit
def normal_pair_from_bits(ra, rb, loc, scale):
    """Two independent N(loc, scale^2) values from two words, by Box-Muller:
    R = sqrt(-2 log u), u = (ra + 1/2) 2^-32 in (0, 1] (so |z| <= 6.77); the angle
    2 pi t, t = (rb >> 8) 2^-24 - 1/2; z0 = R cos, z1 = R sin."""
    u = (ra.to(tl.float32) + 0.5) * _TWO_POW_M32
    radius = tl.sqrt(-2.0 * tl.log(u))
    sin_t, cos_t = _sincos_turns((rb >> 8).to(tl.float32) * _TWO_POW_M24 - 0.5)
    return loc + scale * (radius * cos_t), loc + scale * (radius * sin_t)


@triton.jit
def trunc_normal_from_bits(r, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass):
    """x = clamp(loc + scale z, lo, hi), z ~ N(0, 1) truncated to [alpha, beta], by inversion.

    cdf_lo = Phi(alpha), sf_hi = Phi(-beta), cdf_hi = Phi(beta), mass = Phi(beta) - Phi(alpha),
    with alpha + beta <= 0 (the host mirrors the interval and negates scale otherwise), so
    the draws measured from alpha never pass p = 1/2.
    """
    from_upper = (r >> 31) != 0
    t = ((r & 0x7FFFFFFF).to(tl.float32) + 0.5) * _TWO_POW_M32
    d = t * mass
    p = tl.where(from_upper, sf_hi + d, cdf_lo + d)
    pc = tl.where(from_upper, cdf_hi - d, 1.0 - p)
    z = normal_ppf(p, pc)
    z = tl.where(from_upper, -z, z)
    return tl.minimum(tl.maximum(loc + scale * z, lo), hi)


@triton.jit
def _block_values(seed, stream, start, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass, out_ptr,
                  KIND: tl.constexpr, BLOCK: tl.constexpr):
    """fp32 values of elements start .. start + BLOCK - 1 (start a multiple of BLOCK), to be
    stored through out_ptr."""
    if KIND == _KIND_CONSTANT:
        values = tl.zeros([BLOCK], dtype=tl.float32) + loc
    else:
        counter = start // 4 + tl.arange(0, BLOCK // 4)
        zero = tl.zeros([BLOCK // 4], dtype=tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, counter.to(tl.uint32), (counter >> 32).to(tl.uint32),
                                   zero + tl.cast(stream, tl.uint32), zero)
        if KIND == _KIND_UNIFORM:
            v0 = uniform_from_bits(r0, lo, hi, out_ptr)
            v1 = uniform_from_bits(r1, lo, hi, out_ptr)
            v2 = uniform_from_bits(r2, lo, hi, out_ptr)
            v3 = uniform_from_bits(r3, lo, hi, out_ptr)
        elif KIND == _KIND_NORMAL:
            v0, v1 = normal_pair_from_bits(r0, r1, loc, scale)
            v2, v3 = normal_pair_from_bits(r2, r3, loc, scale)
        elif KIND == _KIND_TRUNC_NORMAL:
            v0 = trunc_normal_from_bits(r0, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass)
            v1 = trunc_normal_from_bits(r1, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass)
            v2 = trunc_normal_from_bits(r2, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass)
            v3 = trunc_normal_from_bits(r3, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass)
        else:
            tl.static_assert(False, "fill: unknown KIND")
        # element 4 c + k takes value k of counter c; transforming before interleaving keeps
        # the interleave in registers (interleaving the raw words first costs a round trip
        # through shared memory)
        values = tl.interleave(tl.interleave(v0, v2), tl.interleave(v1, v3))
    return values


@triton.jit
def _store_block(out_ptr, start, numel, values, BLOCK: tl.constexpr):
    """Store a block at elements start.. (start a multiple of BLOCK); unmasked when full."""
    offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    values = round_like(values, out_ptr)
    if start + BLOCK <= numel:
        tl.store(out_ptr + offs, values)
    else:
        tl.store(out_ptr + offs, values, mask=offs < numel)


# ----------------------------------------------------------------------------------
# kernels: memory
# ----------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed", "stream"])
def fill_kernel(out_ptr, numel, seed, stream,
                loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass,
                KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Fill one dense tensor of ``numel`` elements with random values (flat 1-D grid).

    out_ptr: the tensor's memory (fp32, bf16 or fp16); seed (int64) and stream: the Philox
    key and counter word 2. KIND_UNIFORM reads lo, hi; KIND_NORMAL reads loc, scale;
    KIND_TRUNC_NORMAL reads loc, scale, the clamp bounds lo, hi and the interval's cdf_lo,
    sf_hi, cdf_hi, mass (see ``trunc_normal_from_bits``). All of them are runtime fp32
    scalars: new bounds never recompile.
    Bytes per element: ``mechgpu.traffic.fill_bytes`` (written once, nothing read).
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK
    values = _block_values(seed, stream, start, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass, out_ptr,
                           KIND, BLOCK)
    _store_block(out_ptr, start, numel, values, BLOCK)


@triton.jit
def _unpack_pair(word):
    """Two fp32 values packed in one int64 table entry (low word first)."""
    first = word.to(tl.int32).to(tl.float32, bitcast=True)
    second = (word >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return first, second


@triton.jit(do_not_specialize=["seed"])
def fill_multi_kernel(table_ptr, blocks_ptr, seed,
                      DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Fill every tensor of a table in one launch, each with its own kind and parameters.

    Program ``pid`` fills block ``blocks[pid, 1]`` of tensor ``blocks[pid, 0]``. The table
    row of a tensor holds its address, Philox stream, kind (uniform, normal, truncated
    normal, constant), element count and parameters (fp32 pairs, as ``fill_kernel`` takes
    them). ``seed`` is the Philox key of the launch; the kind is the same for every lane of
    a program, so only one branch runs.
    Bytes per element: ``mechgpu.traffic.fill_bytes`` (written once; nothing read but the row).
    """
    pid = tl.program_id(0)
    tensor_idx = tl.load(blocks_ptr + 2 * pid)
    block_idx = tl.load(blocks_ptr + 2 * pid + 1)
    row = table_ptr + tensor_idx.to(tl.int64) * _NCOL
    out_ptr = tl.load(row + _COL_PTR).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        out_ptr = tl.multiple_of(out_ptr, 16)
    stream = tl.load(row + _COL_STREAM)
    numel = tl.load(row + _COL_NUMEL)
    kind = tl.load(row + _COL_KIND)
    loc, scale = _unpack_pair(tl.load(row + _COL_LOC_SCALE))
    lo, hi = _unpack_pair(tl.load(row + _COL_LO_HI))
    cdf_lo, sf_hi = _unpack_pair(tl.load(row + _COL_CDF_LO_SF_HI))
    cdf_hi, mass = _unpack_pair(tl.load(row + _COL_CDF_HI_MASS))
    start = block_idx.to(tl.int64) * BLOCK
    if kind == _KIND_UNIFORM:
        values = _block_values(seed, stream, start, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass,
                               out_ptr, _KIND_UNIFORM, BLOCK)
    elif kind == _KIND_NORMAL:
        values = _block_values(seed, stream, start, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass,
                               out_ptr, _KIND_NORMAL, BLOCK)
    elif kind == _KIND_TRUNC_NORMAL:
        values = _block_values(seed, stream, start, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass,
                               out_ptr, _KIND_TRUNC_NORMAL, BLOCK)
    else:
        values = _block_values(seed, stream, start, loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass,
                               out_ptr, _KIND_CONSTANT, BLOCK)
    _store_block(out_ptr, start, numel, values, BLOCK)


# ----------------------------------------------------------------------------------
# launchers: plain Python, torch tensors in
# ----------------------------------------------------------------------------------
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _std_normal_cdf(x: float) -> float:
    """Phi(x) in float64, accurate in the lower tail."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


@dataclass(frozen=True)
class Fill:
    """What one tensor is filled with: a kind and its fp32 kernel parameters.

    Build it with ``Fill.uniform``, ``Fill.normal``, ``Fill.trunc_normal`` or ``Fill.constant``.
    """

    kind: int
    loc: float = 0.0
    scale: float = 1.0
    lo: float = -math.inf
    hi: float = math.inf
    cdf_lo: float = 0.0
    sf_hi: float = 0.0
    cdf_hi: float = 1.0
    mass: float = 1.0

    @staticmethod
    def uniform(a: float, b: float) -> Fill:
        """U[a, b); a <= b is the caller's check."""
        return Fill(KIND_UNIFORM, lo=float(a), hi=float(b))

    @staticmethod
    def normal(mean: float, std: float) -> Fill:
        """N(mean, std^2), std >= 0."""
        return Fill(KIND_NORMAL, loc=float(mean), scale=float(std))

    @staticmethod
    def trunc_normal(mean: float, std: float, a: float, b: float) -> Fill:
        """N(mean, std^2) conditioned on [a, b], then clamped to [a, b]; std != 0, a <= b.

        The kernel inverts the CDF from whichever end of [alpha, beta] = [(a - mean)/|std|,
        (b - mean)/|std|] each draw starts at; the interval is mirrored (and the scale
        negated) so that alpha + beta <= 0, which keeps every argument of Phi^-1 a
        probability it can resolve. Tail probabilities underflow fp32 below about 1e-38,
        so intervals lying entirely beyond 13 std of the mean collapse onto their nearer end.
        """
        std = abs(float(std))
        alpha, beta = (a - mean) / std, (b - mean) / std
        scale = std
        if alpha + beta > 0:
            alpha, beta, scale = -beta, -alpha, -std
        cdf_lo, cdf_hi = _std_normal_cdf(alpha), _std_normal_cdf(beta)
        return Fill(KIND_TRUNC_NORMAL, loc=float(mean), scale=scale, lo=float(a), hi=float(b),
                    cdf_lo=cdf_lo, sf_hi=_std_normal_cdf(-beta), cdf_hi=cdf_hi,
                    mass=max(cdf_hi - cdf_lo, 0.0))

    @staticmethod
    def constant(value: float) -> Fill:
        return Fill(KIND_CONSTANT, loc=float(value))

    def fp32_params(self) -> list[float]:
        """loc, scale, lo, hi, cdf_lo, sf_hi, cdf_hi, mass rounded to fp32 (overflow -> inf)."""
        values = [self.loc, self.scale, self.lo, self.hi, self.cdf_lo, self.sf_hi, self.cdf_hi, self.mass]
        return torch.tensor(values, dtype=torch.float64).to(torch.float32).tolist()


def _check_fillable(t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"init kernels fill float32, bfloat16 and float16 tensors, not {t.dtype}")
    if not t.is_contiguous():
        raise ValueError("init kernels fill contiguous tensors; fill a contiguous copy and copy_ it back")


def fill_(tensor: torch.Tensor, fill: Fill, seed: int, stream: int = 0) -> None:
    """Fill a contiguous fp32/bf16/fp16 tensor in place (one launch)."""
    _check_fillable(tensor)
    numel = tensor.numel()
    if numel == 0:
        return
    block = fill_block(numel)
    kind, *params = fill.kind, *fill.fp32_params()
    with device_guard(tensor.device):
        fill_kernel[(triton.cdiv(numel, block),)](
            tensor, numel, seed, stream, *params,
            KIND=kind, BLOCK=block, num_warps=fill_warps(block),
        )


def _pack_pairs(params: list[list[float]]) -> list[list[int]]:
    """Rows of eight fp32 values -> rows of four int64 words, two values per word (low first)."""
    packed = []
    for row in params:
        raw = struct.pack("<8f", *row)
        packed.append(list(struct.unpack("<4q", raw)))
    return packed


class FillPlan:
    """The device tables for filling a fixed list of tensors, built once and launched any
    number of times: each ``launch(seed)`` draws fresh values for every tensor.

    Tensor ``i`` uses Philox stream ``i``. There is one launch per (device, dtype,
    16-byte alignment) bucket, so a model whose parameters share one device and dtype
    takes one. The tables hold the tensors' addresses: ``launch`` checks that they are
    unchanged (the tensors were not re-allocated) before it runs.
    """

    def __init__(self, tensors: list[torch.Tensor], fills: list[Fill]) -> None:
        if len(tensors) != len(fills):
            raise ValueError(f"{len(tensors)} tensors but {len(fills)} fills")
        self.tensors = list(tensors)
        self._ptrs = [t.data_ptr() for t in self.tensors]
        grouped: dict[tuple, tuple[list[int], list[list[int]]]] = {}
        for stream, (t, f) in enumerate(zip(self.tensors, fills)):
            _check_fillable(t)
            if t.numel() == 0:
                continue
            numels, rows = grouped.setdefault((t.device, t.dtype, t.data_ptr() % 16 == 0), ([], []))
            loc_scale, lo_hi, cdf_lo_sf_hi, cdf_hi_mass = _pack_pairs([f.fp32_params()])[0]
            numels.append(t.numel())
            rows.append(TABLE.row(ptr=t.data_ptr(), stream=stream, loc_scale=loc_scale, lo_hi=lo_hi,
                                  cdf_lo_sf_hi=cdf_lo_sf_hi, cdf_hi_mass=cdf_hi_mass, numel=t.numel(), kind=f.kind))
        self._buckets = []
        for (device, dtype, aligned), (numels, rows) in grouped.items():
            plan = MultiTensorPlan(numels, device, TABLE)
            plan.set_rows(rows)
            self._buckets.append((plan, TL_DTYPES[dtype], aligned))

    @property
    def launches(self) -> int:
        return len(self._buckets)

    def launch(self, seed: int) -> None:
        """Fill every tensor, with Philox key ``seed``."""
        if [t.data_ptr() for t in self.tensors] != self._ptrs:
            raise RuntimeError("a tensor of this FillPlan was re-allocated since the plan was built; "
                               "build a new plan")
        for plan, dtype, aligned in self._buckets:
            with device_guard(plan.device):
                fill_multi_kernel[(plan.num_blocks,)](
                    plan.table, plan.blocks, seed,
                    DTYPE=dtype, ALIGNED=aligned, BLOCK=plan.block, num_warps=plan.num_warps,
                )


def aot_variants() -> list:
    """The specialisations the compile test and bench/kernel_report.py compile.

    These kernels only store, so no variant expects a 128-bit load; the aligned ones must
    store with 128-bit STG.E.128.
    """
    from ._launch import MULTI_TENSOR_BLOCKS, multi_tensor_warps
    from .aot import variant

    variants = []
    scalars = {"numel": "i32", "seed": "i64", "stream": "i32"}
    scalars.update({name: "fp32" for name in ("loc", "scale", "lo", "hi", "cdf_lo", "sf_hi", "cdf_hi", "mass")})
    block = fill_block(1 << 24)
    for dtype_name in ("fp32", "bf16"):
        sig = {"out_ptr": f"*{dtype_name}", **scalars}
        for kind_name, kind in (("uniform", KIND_UNIFORM), ("normal", KIND_NORMAL),
                                ("trunc_normal", KIND_TRUNC_NORMAL)):
            cx = {"KIND": kind, "BLOCK": block}
            variants.append(variant(f"init_fill[{dtype_name},{kind_name}]", fill_kernel, sig, cx,
                                    True, fill_warps(block), vector_loads=False))
    multi_block = MULTI_TENSOR_BLOCKS[0]
    multi_sig = {"table_ptr": "*i64", "blocks_ptr": "*i32", "seed": "i64"}
    for dtype_name, dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        for aligned in (True, False):
            cx = {"DTYPE": dtype, "ALIGNED": aligned, "BLOCK": multi_block}
            tag = f"{dtype_name}{'' if aligned else ',unaligned'}"
            variants.append(variant(f"init_fill_multi[{tag}]", fill_multi_kernel, multi_sig, cx,
                                    aligned, multi_tensor_warps(multi_block), vector_loads=False))
    return variants
