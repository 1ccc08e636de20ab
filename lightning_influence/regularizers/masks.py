r"""Boolean penalty masks over the flat parameter vector (True = penalised), from names or from a module.

Biases are left unpenalised by default, and :func:`mask_from_module` also leaves normalisation layers unpenalised.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_influence.exceptions import ConfigurationError

__all__ = ["mask_from_module", "mask_from_named_parameters"]


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(last == pattern or fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def mask_from_named_parameters(named_params: Mapping[str, Tensor], exclude: Sequence[str] = ("bias",)) -> Tensor:
    r"""Build the flat boolean penalty mask of a parameter dict (True = penalised).

    The flat order is the iteration order of ``named_params`` with each tensor flattened by
    ``.reshape(-1)``, matching the flat parameter vector :math:`\theta = (\operatorname{vec}(W_1), \dots)`.

    .. math::

        m_i = \begin{cases} 0 & \text{coordinate } i \text{ belongs to an excluded name} \\
        1 & \text{otherwise} \end{cases}

    A name is excluded when a pattern equals its last dotted component (``"bias"`` matches ``"fc.bias"`` but
    not ``"bias_net.weight"``) or matches the full name as an ``fnmatch`` glob (``"*norm*"``,
    ``"encoder.*"``). Norm-layer weights are only excluded by name; use :func:`mask_from_module` to exclude
    them by layer type.

    Args:
        named_params: Ordered mapping name -> tensor (e.g. ``dict(model.named_parameters())``).
        exclude: Names/glob patterns of unpenalised parameters.

    Returns:
        A CPU ``torch.bool`` tensor of length :math:`P = \sum \text{numel}`.

    Raises:
        ConfigurationError: If ``named_params`` is empty, a value is not a tensor, or ``exclude`` is a bare string.

    Example::

        >>> import torch
        >>> params = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}
        >>> mask_from_named_parameters(params).tolist()
        [True, True, True, True, False, False]
    """
    if isinstance(exclude, (str, bytes)):
        raise ConfigurationError(f"exclude must be a sequence of patterns, e.g. ('bias',), not the string {exclude!r}")
    if len(named_params) == 0:
        raise ConfigurationError("named_params is empty: the model has no (trainable) parameters to build a mask for")
    pieces: list[Tensor] = []
    for name, tensor in named_params.items():
        if not isinstance(tensor, Tensor):
            raise ConfigurationError(f"named_params[{name!r}] must be a tensor, got {type(tensor).__name__}")
        pieces.append(torch.full((tensor.numel(),), not _excluded(name, exclude), dtype=torch.bool))
    return torch.cat(pieces)


_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def mask_from_module(
    module: nn.Module,
    exclude: Sequence[str] = ("bias",),
    *,
    unpenalise_norm_layers: bool = True,
    trainable_only: bool = True,
) -> Tensor:
    r"""Build the penalty mask of a module's parameters, also excluding normalisation layers by type.

    The flat order is ``module.named_parameters()`` (restricted to ``requires_grad`` parameters when
    ``trainable_only``), each flattened by ``.reshape(-1)``.

    .. math::

        m = \text{mask\_from\_named\_parameters}(\text{params}, \text{exclude}) \wedge
        \neg\,[\text{parameter of a norm layer}]

    Args:
        module: The model.
        exclude: Names/glob patterns of unpenalised parameters (see :func:`mask_from_named_parameters`).
        unpenalise_norm_layers: Also leave parameters of BatchNorm/LayerNorm/GroupNorm/InstanceNorm/RMSNorm
            layers unpenalised.
        trainable_only: Only include parameters with ``requires_grad``.

    Returns:
        A CPU ``torch.bool`` tensor.

    Raises:
        ConfigurationError: If the module has no (trainable) parameters.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.LayerNorm(1))
        >>> mask_from_module(net).tolist()
        [True, True, False, False, False]
    """
    norm_names: set[str] = set()
    if unpenalise_norm_layers:
        for module_name, sub in module.named_modules():
            if isinstance(sub, _NORM_LAYERS):
                prefix = f"{module_name}." if module_name else ""
                norm_names.update(prefix + n for n, _ in sub.named_parameters(recurse=False))
    params = {n: p for n, p in module.named_parameters() if p.requires_grad or not trainable_only}
    mask = mask_from_named_parameters(params, exclude)
    if norm_names:
        keep = torch.cat([torch.full((p.numel(),), n not in norm_names, dtype=torch.bool) for n, p in params.items()])
        mask = mask & keep
    return mask
