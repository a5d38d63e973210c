"""Maximising a smooth objective of one positive quantity on a log10 scale: a grid, then
golden-section search around its best point. Tunes the prior precision (marginal likelihood,
validation NLL; :mod:`lalora.laplace.marglik`, :mod:`lalora.laplace.tuning`) and the
temperature (:func:`lalora.models.baselines.fit_temperature`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lalora.core.errors import UserError

GOLDEN = (math.sqrt(5) - 1) / 2


class SearchError(UserError, RuntimeError):
    """The search range does not bracket an optimum: the message names where."""


@dataclass(frozen=True)
class SearchResult:
    """The best log10 x, its objective, the grid of (log10 x, objective), and ``at_edge``
    ("low" or "high") when the optimum is not bracketed and the edge was accepted."""

    log10: float
    value: float
    grid: list[tuple[float, float]]
    at_edge: str | None = None


def maximise_log10(
    objective: Callable[[float], float],
    lo: float,
    hi: float,
    grid: int,
    where: str,
    accept_edge: bool = False,
) -> SearchResult:
    """Maximise ``objective(log10 x)`` over [lo, hi]: a grid of ``grid`` points, then
    golden-section search around the best grid point to 1e-8 in log10. Deterministic. If the
    best point is on the range's edge, raises :class:`SearchError`, or with ``accept_edge``
    returns that edge (``at_edge``)."""
    xs = [lo + (hi - lo) * i / (grid - 1) for i in range(grid)]
    ys = [objective(x) for x in xs]
    if not all(math.isfinite(y) for y in ys):
        raise SearchError(f"{where}: non-finite objective on the prior grid")
    # ties go to the larger lambda: a flat objective (a module the data never reach, with its
    # weights at the prior mean) gets the tightest prior, not the widest
    best = max(range(grid), key=lambda i: (ys[i], i))
    if best in (0, grid - 1) and accept_edge:
        return SearchResult(
            log10=xs[best],
            value=ys[best],
            grid=list(zip(xs, ys, strict=True)),
            at_edge="low" if best == 0 else "high",
        )
    if best in (0, grid - 1):
        raise SearchError(
            f"{where}: the optimum is not bracketed in log10(prior precision) in [{lo}, {hi}] "
            f"(best at the edge, {xs[best]}); widen prior.log10_min/log10_max"
        )
    a, b = xs[best - 1], xs[best + 1]
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = objective(c), objective(d)
    while b - a > 1e-8:
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = objective(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = objective(d)
    x = (a + b) / 2
    return SearchResult(log10=x, value=objective(x), grid=list(zip(xs, ys, strict=True)))
