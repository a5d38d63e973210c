"""Where the evidence's prior penalty falls: the measurements behind the choice of prior.

With delta = theta* - mu and the posterior's curvature H (Kronecker, per module: eigenvalues
h_ij = a_i g_j with coordinates c_ij of delta, :meth:`Posterior.with_delta`):

- ``delta_h_delta`` = delta^T H delta = sum h c^2: how much of delta the data constrain (in
  nats, twice the quadratic model's log-likelihood drop from theta* back to mu);
- the shares of ||delta||^2 in directions with h > lambda (the data determine them), h <= lambda
  within the kept eigenbasis, and outside it (h = 0: low-rank sides' complement);

and the LoRA symmetry: for any invertible r x r M, (B M, M^-1 A) is the same function B A, so
at theta* the r^2 directions (B E, -E A) (E any r x r matrix) have zero Jacobian. The exact GGN
gives them zero curvature; a block-diagonal (per-module) curvature gives each half its own
positive curvature. :func:`lora_symmetry` measures the share of ||delta||^2 along them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lalora.laplace.posterior import Posterior


@dataclass(frozen=True)
class Penalty:
    """Where ||theta* - mu||^2 lies relative to the curvature at prior precision lambda."""

    delta_sq: float
    delta_h_delta: float
    above: float
    below: float
    outside: float

    def as_dict(self) -> dict[str, float]:
        return {
            "delta_sq": self.delta_sq,
            "delta_h_delta": self.delta_h_delta,
            "share_h_above_lambda": self.above,
            "share_h_below_lambda": self.below,
            "share_outside_kept_rank": self.outside,
        }


def penalty_shares(post: Posterior) -> Penalty:
    """The penalty's split for ``post`` (centred by :meth:`Posterior.with_delta`, prior tuned)."""
    if not post.prior_precision:
        raise ValueError("no prior precision: tune the prior first")
    total = dhd = above = below = 0.0
    for name, m in post.modules.items():
        if m.delta is None:
            raise ValueError(f"module {name}: no delta coordinates (Posterior.with_delta)")
        h = torch.outer(m.a.evals, m.g.evals)  # (k_a, k_g)
        c2 = m.delta.pow(2)
        lam = post.prior_precision[name]
        total += m.theta_sq
        dhd += float((h * c2).sum())
        above += float(c2[h > lam].sum())
        below += float(c2[h <= lam].sum())
    kept = above + below
    norm = max(total, 1e-300)
    return Penalty(
        delta_sq=total,
        delta_h_delta=dhd,
        above=above / norm,
        below=below / norm,
        outside=max(total - kept, 0.0) / norm,
    )


def symmetry_projection(B: Tensor, A: Tensor, dB: Tensor, dA: Tensor) -> tuple[Tensor, Tensor]:
    """The orthogonal projection of (dB, dA) onto {(B E, -E A): E (r, r)}.

    Args: B (d_out, r), A (r, d_in): one adapter's maps at theta*; dB, dA the same shapes.
    The least-squares E solves the Sylvester equation B^T B E + E A A^T = B^T dB - dA A^T.
    Returns the projected (B E, -E A).
    """
    B, A, dB, dA = (x.double() for x in (B, A, dB, dA))
    r = B.shape[1]
    eye = torch.eye(r, dtype=torch.float64)
    op = torch.kron(eye, B.T @ B) + torch.kron(A @ A.T, eye)  # acts on column-major vec(E)
    rhs = (B.T @ dB - dA @ A.T).T.reshape(-1)
    E = torch.linalg.lstsq(op, rhs[:, None]).solution.reshape(r, r).T
    return B @ E, -E @ A


def _adapters(weights: dict[str, Tensor]) -> list[tuple[str, str]]:
    """(lora_A name, lora_B name) of every adapter whose two maps are both in ``weights``."""
    pairs = [(n, n.replace(".lora_A.", ".lora_B.")) for n in weights if ".lora_A." in n]
    return [(a, b) for a, b in pairs if b in weights]


def lora_symmetry(weights: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, float]:
    """The share of ||delta||^2 along the LoRA symmetry directions, over all adapters.

    ``weights`` and ``delta``: by LoRA module name (``...lora_A.<adapter>``, ``...lora_B...``),
    (d_out, d_in) each. Returns ``share`` and ``delta_sq`` (the squared norm of that part).
    """
    sym = 0.0
    for a, b in _adapters(weights):
        pB, pA = symmetry_projection(weights[b], weights[a], delta[b], delta[a])
        sym += float(pB.pow(2).sum() + pA.pow(2).sum())
    total = sum(float(d.double().pow(2).sum()) for d in delta.values())
    return {"share": sym / max(total, 1e-300), "delta_sq": sym}


def remove_symmetry(weights: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
    """``delta`` minus its projection on every adapter's symmetry directions."""
    out = {n: d.double().clone() for n, d in delta.items()}
    for a, b in _adapters(weights):
        pB, pA = symmetry_projection(weights[b], weights[a], delta[b], delta[a])
        out[b] -= pB
        out[a] -= pA
    return out
