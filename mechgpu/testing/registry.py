"""The case database's one registration idiom: each family module declares a tuple ``CASES`` of
``Case`` records, and ``collect`` joins the families into one name-ordered table."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType

import torch

from .compare import DTYPE_NAMES, Errors, Row


@dataclass
class Context:
    """What a case needs: the device, the mode, and reproducible random inputs."""

    device: torch.device
    quick: bool
    seed: int
    case: str = ""

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Tensor sizes: 1, odd, not a power of 2, more than one block (and empty in full runs); in full
        runs also just below and above a 16-byte vector of 16-bit elements (multi_tensor.VECTOR: whole
        vectors, then the rest one by one) and just below a block."""
        if self.quick:
            return (1, 3, 4097)
        large = (1 << 20) + 3 if self.device.type == "cuda" else 12289  # the interpreter is slow
        return (0, 1, 3, 7, 9, 1000, 2047, 4097, large)

    @property
    def steps(self) -> int:
        return 3 if self.quick else 8

    def generator(self) -> torch.Generator:
        """A CPU generator for this case: the run's seed mixed with the case's name."""
        from .._backend import mixed_seed

        return torch.Generator().manual_seed(mixed_seed(self.seed, zlib.crc32(self.case.encode())))

    def randn(self, shape, gen: torch.Generator, *, scale: float = 1.0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, scale^2) drawn on the CPU (the same numbers on every device), then moved."""
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(self.device, dtype)

    def row(self, check: str, dtype: torch.dtype | str, errs: Errors, tolerance: str) -> Row:
        dtype_name = DTYPE_NAMES.get(dtype, str(dtype))
        return Row(self.case, check, dtype_name, errs.max_abs, errs.max_rel, tolerance, errs.err_over_tol,
                   errs.passed, "; ".join(errs.failures[:3]))


CaseFn = Callable[[Context], Iterable[Row]]


@dataclass(frozen=True)
class Case:
    """One named case: ``run(ctx)`` yields its rows. ``name`` is ``<family>.<what>``, as
    ``mechgpu check --list`` prints it."""

    name: str
    run: CaseFn

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]


def collect(*families: ModuleType) -> dict[str, Case]:
    """The families' ``CASES``, in order, by name; a repeated name is an error."""
    cases: dict[str, Case] = {}
    for family in families:
        for case in family.CASES:
            if case.name in cases:
                raise ValueError(f"duplicate check {case.name!r}")
            cases[case.name] = case
    return cases
