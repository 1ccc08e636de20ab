"""Parameter pytrees and seeded probes.

A *parameter tree* is a ``dict[str, Tensor]`` of a module's **trainable** parameters (``requires_grad``),
keyed by their qualified names. Frozen parameters and buffers are left in the module and picked up by
``torch.func.functional_call``. Vectors in parameter space are handled flat (1-D, length ``P``) by the
solvers and spectrum estimators; :func:`flatten` and :func:`unflatten` convert between the two views in
the order of :func:`trainable_parameters`.

Probes come from a dedicated, seeded :class:`torch.Generator`; the global RNG is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_influence.exceptions import ConfigurationError

ParamTree = dict[str, Tensor]
ProbeKind = Literal["rademacher", "gaussian"]


def trainable_parameters(model: nn.Module) -> ParamTree:
    """Return the trainable parameters of ``model`` as a detached parameter tree.

    Args:
        model: Any module.

    Returns:
        ``{name: tensor}`` with every parameter whose ``requires_grad`` is true, detached (sharing storage).

    Raises:
        ConfigurationError: If the module has no trainable parameter.

    Example::

        >>> tree = trainable_parameters(torch.nn.Linear(3, 2))
        >>> sorted(tree)
        ['bias', 'weight']
    """
    tree = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not tree:
        raise ConfigurationError(
            f"{type(model).__name__} has no trainable parameters (all have requires_grad=False); curvature is "
            "taken with respect to trainable parameters only. Unfreeze the parameters you want to analyse."
        )
    return tree


def num_parameters(tree: ParamTree) -> int:
    """Total number of scalars in a parameter tree.

    Returns:
        The sum of the leaves' ``numel()`` (``P``).

    Example::

        >>> num_parameters(trainable_parameters(torch.nn.Linear(3, 2)))  # 3 * 2 weights + 2 biases
        8
    """
    return sum(t.numel() for t in tree.values())


def flatten(tree: ParamTree) -> Tensor:
    """Concatenate a parameter tree into one flat vector, in the tree's key order.

    Returns:
        The flat vector of all leaves.

    Example::

        >>> flatten({"a": torch.ones(2, 2), "b": torch.zeros(1)}).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0]
    """
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflatten(vector: Tensor, like: ParamTree) -> ParamTree:
    """Split a flat vector (or a ``(P, k)`` matrix, column-wise) into a tree shaped like ``like``.

    Args:
        vector: Tensor of shape ``(P,)`` or ``(P, k)``.
        like: Tree that fixes names, shapes and order.

    Returns:
        A tree of views into ``vector``; for a matrix input each leaf has a trailing dimension ``k``.

    Raises:
        ConfigurationError: If the leading dimension is not ``P``.

    Example::

        >>> t = unflatten(torch.arange(3.0), {"w": torch.zeros(1, 2), "b": torch.zeros(1)})
        >>> t["w"].tolist(), t["b"].tolist()
        ([[0.0, 1.0]], [2.0])
    """
    total = num_parameters(like)
    if vector.shape[0] != total:
        raise ConfigurationError(f"vector has leading dimension {vector.shape[0]} but the parameters have {total}.")
    extra = tuple(vector.shape[1:])
    parts = vector.split([ref.numel() for ref in like.values()])
    return {name: part.reshape(*ref.shape, *extra) for (name, ref), part in zip(like.items(), parts, strict=True)}


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator seeded with ``seed``; the global RNG is left alone.

    Returns:
        A new :class:`torch.Generator` on ``device``.

    Example::

        >>> a = torch.rand(3, generator=make_generator(0))
        >>> torch.equal(a, torch.rand(3, generator=make_generator(0)))  # same seed, same draws
        True
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def derive_seed(seed: int, *tags: object) -> int:
    """A sub-seed for one named use of ``seed``: the same ``(seed, tags)`` always gives the same value.

    Every random draw of the package that derives from a user's seed names its purpose here (``"lissa-step"``
    and the step, ``"certificate"``, ...), so draws for different purposes are independent and no magic offsets
    are needed. The value is a 63-bit hash of ``repr((seed, tags))`` (stable across processes and platforms).

    Returns:
        A non-negative integer usable with :func:`make_generator`.

    Example::

        >>> derive_seed(0, "lissa-step", 3) == derive_seed(0, "lissa-step", 3)
        True
        >>> derive_seed(0, "lissa-step", 3) != derive_seed(0, "lissa-step", 4)
        True
    """
    digest = hashlib.blake2b(repr((int(seed), tags)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Restore torch's CPU RNG, Python's ``random`` and NumPy's global RNG on exit.

    A dataset's ``__getitem__`` (augmentations) may draw from them; collating a curvature sample inside this
    context keeps the training run's random stream exactly as it would be without the callbacks.

    Example::

        >>> before = torch.get_rng_state()
        >>> with isolated_rng():
        ...     _ = torch.rand(3)
        >>> torch.equal(before, torch.get_rng_state())
        True
    """
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def probe(
    size: int | tuple[int, ...],
    generator: torch.Generator,
    *,
    kind: ProbeKind = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw a random probe with ``E[v vᵀ] = I`` from ``generator``.

    Args:
        size: Shape of the probe (``P`` or ``(P, k)``).
        generator: Seeded generator; its device must match ``device``.
        kind: ``"rademacher"`` (±1, lowest Hutchinson variance) or ``"gaussian"`` (standard normal).
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        The probe tensor.

    Raises:
        ConfigurationError: For an unknown ``kind``.

    Example::

        >>> v = probe(5, make_generator(0))
        >>> sorted(set(v.abs().tolist()))
        [1.0]
    """
    shape = (size,) if isinstance(size, int) else tuple(size)
    if kind == "rademacher":
        # Eight signs per random byte: one draw of numel/8 bytes instead of numel int64 draws (about 3x
        # faster at a million entries, where a probe's cost is otherwise comparable to the product's
        # bookkeeping).
        numel = math.prod(shape)
        packed = torch.randint(0, 256, ((numel + 7) // 8,), generator=generator, device=device, dtype=torch.uint8)
        shifts = torch.arange(8, device=device, dtype=torch.uint8)
        bits = (packed.unsqueeze(1) >> shifts).bitwise_and_(1).reshape(-1)[:numel]
        return bits.to(dtype).mul_(2).sub_(1).reshape(shape)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    raise ConfigurationError(f"probe kind={kind!r} is not supported; use 'rademacher' or 'gaussian'.")


def all_finite(tensor: Tensor) -> bool:
    """Return whether every entry of ``tensor`` is finite, with one reduction in the common case.

    The sum of a finite tensor is finite unless it overflows, and the sum of a tensor holding ``inf`` or
    ``nan`` is never finite, so a finite sum proves every entry finite. Only an infinite sum (a true
    non-finite entry, or an overflow of finite entries) pays for the exact elementwise check. At a
    million entries this is about twenty times cheaper than ``torch.isfinite(tensor).all()``, which
    allocates a boolean tensor of the same size.

    Args:
        tensor: Any floating tensor.

    Returns:
        ``True`` when no entry is ``inf`` or ``nan``.

    Example::

        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    if tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())
