"""Seeds: parsing ranges and per-seed noise, so a sample depends only on its seed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: The most seeds one run takes (a list of that many seeds already holds ~1 GB).
MAX_SEEDS = 10_000_000
#: Seeds are torch generator seeds: below 2**63.
SEED_LIMIT = 2**63


def _ranges(text: str) -> list[tuple[int, int]]:
    """``(first, last)`` of every comma-separated part of a seed list."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else ("", "")
                first, last = int(lo), int(hi)
                if last < first:
                    raise ValueError
            else:
                first = last = int(part)
        except ValueError:
            raise ValueError(
                f"seeds: cannot parse {part!r}; use integers and ranges like '0-63,100'"
            ) from None
        out.append((first, last))
    return out


def parse_seeds(text: str) -> list[int]:
    """Parse ``"0-63"``, ``"1,5,9-12"`` into a sorted list of unique seeds (EDM's syntax);
    at most :data:`MAX_SEEDS` of them, each below :data:`SEED_LIMIT`."""
    ranges = _ranges(text)
    if sum(last - first + 1 for first, last in ranges) > MAX_SEEDS:
        raise ValueError(
            f"seeds: {text!r} names more than {MAX_SEEDS:,} seeds, the most one run takes; "
            "split the work into several runs (e.g. --seeds 0-9999999, then 10000000-...)"
        )
    if any(last >= SEED_LIMIT for _, last in ranges):
        raise ValueError(f"seeds: seeds must be below 2**63, got {text!r}")
    seeds: set[int] = set()
    for first, last in ranges:
        seeds.update(range(first, last + 1))
    if not seeds:
        raise ValueError("seeds: no seeds given; use e.g. '0-63'")
    if min(seeds) < 0:
        raise ValueError("seeds: seeds must be >= 0")
    return sorted(seeds)


def noise_for_seeds(
    seeds: Sequence[int],
    shape: Sequence[int],
    scale: float = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of ``shape`` per seed, one CPU generator per seed (as EDM's
    ``StackedRandomGenerator``), stacked along a new batch axis and scaled by ``scale``."""
    rows = [
        torch.randn(
            tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32
        )
        for s in seeds
    ]
    return (torch.stack(rows) * scale).to(device=device, dtype=dtype)
