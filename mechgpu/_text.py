"""Text helpers shared across mechgpu: plain-text tables and byte sizes read and written."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A plain-text table: a header, a rule, then one line per row, columns left-aligned."""
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def parse_bytes(value: str | int) -> int:
    """``"2GiB"`` -> 2147483648, ``"300MB"`` -> 300000000, ``123`` -> 123."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", value.lower())
    if not match:
        raise ValueError(f"cannot read {value!r} as a size in bytes (examples: '2GiB', '300MB', '65536')")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KiB"``: bytes below 1 KiB as an integer, else KiB, MiB or GiB to two decimals."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
