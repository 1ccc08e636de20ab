"""The result every solver returns: the solution and the certificate that says how far it can be trusted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["SolveResult"]


@dataclass
class SolveResult:
    r"""Solution of :math:`(A + \lambda I) X = B` and its certificate.

    Attributes:
        x: Solution, shaped like the right-hand side (``(P,)`` or ``(P, k)``).
        iterations: Iterations (CG) or steps (LiSSA) performed.
        relative_residual: :math:`\max_j \|b_j - (A+\lambda I) x_j\| / \|b_j\|` at exit.
        converged: Whether the tolerance was met.
        method: Solver name.
        num_products: Operator products used (one per column per iteration).
        history: Relative residual per iteration (max over columns).
        diverged: Whether the solver stopped because its iterates grew without bound.
        info: Solver-specific extras (settings, warnings).

    Example::

        >>> import torch
        >>> from lightning_influence.operators import DenseOperator
        >>> from lightning_influence.solvers import conjugate_gradient
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = conjugate_gradient(DenseOperator(a), b, damping=1.0, rtol=1e-10)
        >>> res.method, res.converged, res.iterations, res.num_products, res.relative_residual < 1e-12
        ('cg', True, 2, 3, True)
        >>> torch.allclose(res.x, torch.linalg.solve(a + torch.eye(2, dtype=torch.float64), b))
        True
        >>> [round(r, 6) for r in res.history], res.to_dict()["info"]
        ([1.0, 0.2, 0.0], {'rtol': 1e-10, 'rtol_requested': 1e-10, 'damping': 1.0})
    """

    x: Tensor
    iterations: int
    relative_residual: float
    converged: bool
    method: str
    num_products: int = 0
    history: list[float] = field(default_factory=list)
    diverged: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The certificate without the solution tensor."""
        return {
            "method": self.method,
            "iterations": self.iterations,
            "relative_residual": self.relative_residual,
            "converged": self.converged,
            "diverged": self.diverged,
            "num_products": self.num_products,
            "history": list(self.history),
            "info": dict(self.info),
        }
