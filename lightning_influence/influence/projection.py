r"""A seeded random projection of gradients to ``k`` dimensions (``InfluenceConfig.projection_dim``).

:math:`\Phi \in \mathbb R^{k \times P}` has i.i.d. entries :math:`\pm 1/\sqrt k` (``"rademacher"``) or
:math:`\mathcal N(0, 1/k)` (``"gaussian"``), so :math:`\mathbb E[\Phi^\top\Phi] = I` and
:math:`\langle \Phi a, \Phi b\rangle` is an unbiased estimate of :math:`\langle a, b\rangle`. Influence scores
:math:`-x_q^\top g_z` (with :math:`x_q = (G+\lambda I)^{-1}\nabla\ell(q)`) become :math:`-(\Phi x_q)^\top(\Phi g_z)`:
the training side is stored as ``k`` numbers per example instead of ``P``, and new queries can be scored later
against the stored :math:`\Phi g_z` without recomputing training gradients.

**The Johnson-Lindenstrauss trade-off.** For one pair the estimate's variance is
:math:`(\|a\|^2\|b\|^2 + \langle a,b\rangle^2)/k` for Gaussian entries (Rademacher: at most that), i.e. an error
of about :math:`\|a\|\|b\|/\sqrt k`, independent of ``P``. Over ``n`` pairs, all errors stay below
:math:`\varepsilon\|a\|\|b\|` with high probability once :math:`k \gtrsim 8 \log(n) / \varepsilon^2` (JL lemma).
The error is relative to the *norms*, not to the score: scores much smaller than :math:`\|x_q\|\|g_z\|` (nearly
orthogonal pairs, most of them) are the noisiest in relative terms, so rankings of the top proponents survive a
moderate ``k`` (thousands) better than the small scores do. The self-influence is always computed from the
unprojected gradients.

:math:`\Phi` is never stored whole: it is generated in blocks of parameter rows, each from a seed derived from
``seed`` and the block, so the same ``(seed, k, kind)`` gives the same projection on every rank and in every run.

Example::

    >>> proj = RandomProjection(num_params=1000, dim=4000, seed=0)
    >>> a = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    >>> pa = proj(a.unsqueeze(0))
    >>> pa.shape, abs(float((pa * pa).sum() / (a * a).sum()) - 1) < 0.1   # norms kept to ~ 1/sqrt(k)
    (torch.Size([1, 4000]), True)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_influence.exceptions import ConfigurationError
from lightning_influence.params import derive_seed, make_generator

__all__ = ["RandomProjection"]

#: Parameter rows of :math:`\Phi^\top` generated at once (bounds the memory at ``block * k`` numbers).
_BLOCK = 4096


class RandomProjection:
    r"""Seeded :math:`\Phi \in \mathbb R^{k\times P}` applied to rows of gradients ``(m, P) -> (m, k)``.

    Args:
        num_params: ``P``.
        dim: ``k >= 1``.
        kind: ``"rademacher"`` (default) or ``"gaussian"``.
        seed: Seed of the entries.

    Raises:
        ConfigurationError: For ``dim <= 0``, ``num_params <= 0`` or an unknown ``kind``.

    Example::

        >>> proj = RandomProjection(num_params=3, dim=2, seed=0)
        >>> torch.equal(proj(torch.eye(3)), RandomProjection(3, 2, seed=0)(torch.eye(3)))   # seeded
        True
        >>> sorted({abs(round(v, 6)) for v in proj(torch.eye(3)).flatten().tolist()})   # +-1/sqrt(2)
        [0.707107]
    """

    def __init__(
        self, num_params: int, dim: int, kind: Literal["rademacher", "gaussian"] = "rademacher", seed: int = 0
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigurationError(f"projection dim must be a positive integer number of dimensions, got {dim!r}.")
        if num_params < 1:
            raise ConfigurationError(f"num_params must be >= 1, got {num_params}.")
        if kind not in ("rademacher", "gaussian"):
            raise ConfigurationError(f"projection kind must be 'rademacher' or 'gaussian', got {kind!r}.")
        self.num_params, self.dim, self.kind, self.seed = int(num_params), dim, kind, int(seed)

    def _block(self, b: int, rows: int, dtype: torch.dtype) -> Tensor:
        gen = make_generator(derive_seed(self.seed, "projection", self.dim, self.kind, b))
        if self.kind == "gaussian":
            return torch.randn(rows, self.dim, generator=gen, dtype=dtype) / self.dim**0.5
        signs = torch.randint(0, 2, (rows, self.dim), generator=gen).to(dtype) * 2 - 1
        return signs / self.dim**0.5

    def __call__(self, grads: Tensor) -> Tensor:
        r""":math:`G\Phi^\top` for ``grads`` of shape ``(m, P)``.

        Returns:
            ``(m, k)``.

        Raises:
            ConfigurationError: If ``grads`` is not ``(m, P)``.
        """
        if grads.ndim != 2 or grads.shape[1] != self.num_params:
            raise ConfigurationError(f"expected gradients of shape (m, {self.num_params}), got {tuple(grads.shape)}.")
        out = torch.zeros(grads.shape[0], self.dim, dtype=grads.dtype, device=grads.device)
        for b, start in enumerate(range(0, self.num_params, _BLOCK)):
            stop = min(start + _BLOCK, self.num_params)
            out += grads[:, start:stop] @ self._block(b, stop - start, grads.dtype).to(grads.device)
        return out
