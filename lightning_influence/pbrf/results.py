"""What a PBRF solve returns: per-solve records and the response with its certificate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["PBRFResult", "SolveRecord"]


@dataclass
class SolveRecord:
    r"""Certificate of one PBO minimisation (``sign=+1`` upweights the example, ``-1`` downweights it).

    Attributes:
        sign: ``+1`` or ``-1``.
        iterations: Optimiser iterations (L-BFGS iterations or Gauss-Newton steps).
        evaluations: Objective/gradient evaluations (each is one pass over the data and one reduction).
        initial_grad_norm: :math:`\|\nabla F(\hat\theta)\| = \epsilon \|\nabla \ell(z_m)\|`.
        grad_norm: :math:`\|\nabla F\|` at the returned parameters.
        relative_grad_norm: ``grad_norm / initial_grad_norm`` (0 when the example has zero gradient).
        converged: ``relative_grad_norm <= tol``.
        shift_norm: :math:`\|\theta_{\pm\epsilon} - \hat\theta\|`.
        products: Data curvature products used (``newton_cg`` only; each a pass over the data).
        example_products: One-example Hessian products (``newton_cg``: the example's term of each Newton
            matrix, and the whole of the steps with the data curvature frozen at :math:`\hat\theta`; each costs
            about ``1/N`` of a pass).

    Example::

        >>> import torch
        >>> from lightning_influence.pbrf import PBRF
        >>> from lightning_influence.tasks import Regression
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> _ = torch.nn.init.zeros_(model.weight)  # theta_hat = 0
        >>> x = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
        >>> pbrf = PBRF(model, Regression(), [(x, y)], damping=0.5, epsilon=1e-4)
        >>> theta, rec = pbrf.solve((x[:1], y[:1]), +1)
        >>> rec.sign, rec.converged, rec.relative_grad_norm < 1e-10
        (1, True, True)
        >>> # linear model + squared loss: the PBO is quadratic, its minimiser solves
        >>> # (X^T X / N + eps x_m x_m^T + lambda I) theta = eps y_m x_m
        >>> a = x.T @ x / 2 + 1e-4 * torch.outer(x[0], x[0]) + 0.5 * torch.eye(2, dtype=torch.float64)
        >>> torch.allclose(theta, torch.linalg.solve(a, 1e-4 * y[0] * x[0]), rtol=1e-10, atol=0)
        True
    """

    sign: int
    iterations: int
    evaluations: int
    initial_grad_norm: float
    grad_norm: float
    relative_grad_norm: float
    converged: bool
    shift_norm: float
    products: int = 0
    example_products: int = 0


@dataclass
class PBRFResult:
    r"""PBRF response of one training example and its certificate.

    Attributes:
        response: Central-difference response :math:`(m(\theta_{+\epsilon}) - m(\theta_{-\epsilon}))/(2\epsilon)`,
            shaped like the measurement (``(Q,)`` for query losses); comparable to influence scores
            :math:`I(z_m, q)`.
        epsilon: :math:`\epsilon`.
        damping: :math:`\lambda` of the proximity term.
        optimizer: ``"lbfgs"`` or ``"newton_cg"``.
        dtype: Dtype of the copy the PBO was solved in.
        tol: Relative gradient tolerance.
        converged: Both solves converged.
        iterations: Total optimiser iterations of both solves.
        grad_norm: Largest final gradient norm of the two solves.
        relative_grad_norm: Largest final relative gradient norm of the two solves.
        measurement_base: :math:`m(\hat\theta)`.
        measurement_plus: :math:`m(\theta_{+\epsilon})`.
        measurement_minus: :math:`m(\theta_{-\epsilon})`.
        solves: The two :class:`SolveRecord` (``+ε`` then ``-ε``).
        seconds: Wall time of both solves and measurements.

    Example::

        >>> import torch
        >>> from lightning_influence.pbrf import PBRF
        >>> from lightning_influence.tasks import Regression
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> _ = torch.nn.init.zeros_(model.weight)  # theta_hat = 0
        >>> x = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
        >>> res = PBRF(model, Regression(), [(x, y)], damping=0.5, epsilon=1e-4).response((x[:1], y[:1]),
        ...                                                                              queries=[(x, y)])
        >>> res.converged, res.optimizer, res.dtype, [s.sign for s in res.solves]
        (True, 'newton_cg', 'float64', [1, -1])
        >>> res.measurement_base, [round(v, 4) for v in res.response.tolist()]
        (tensor([0.5000, 0.5000], dtype=torch.float64), [-1.0909, 0.3636])
        >>> torch.equal(res.response, (res.measurement_plus - res.measurement_minus) / (2 * res.epsilon))
        True
    """

    response: Tensor
    epsilon: float
    damping: float
    optimizer: str
    dtype: str
    tol: float
    converged: bool
    iterations: int
    grad_norm: float
    relative_grad_norm: float
    measurement_base: Tensor
    measurement_plus: Tensor
    measurement_minus: Tensor
    solves: list[SolveRecord] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-friendly) description, tensors as lists."""
        return {
            "response": self.response.tolist(),
            "epsilon": self.epsilon,
            "damping": self.damping,
            "optimizer": self.optimizer,
            "dtype": self.dtype,
            "tol": self.tol,
            "converged": self.converged,
            "iterations": self.iterations,
            "grad_norm": self.grad_norm,
            "relative_grad_norm": self.relative_grad_norm,
            "solves": [asdict(s) for s in self.solves],
            "seconds": self.seconds,
        }
