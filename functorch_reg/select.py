"""``where=`` selections: which leaves a penalty, prox, decay or mask applies to.

A selection is one of

* ``None``: every floating-point leaf;
* a glob string or a list of globs on dotted leaf names (``"*.weight"``,
  ``["encoder.*", "head.0.weight"]``); each glob must match a floating-point leaf;
* a predicate ``(name, tensor) -> bool``, e.g. the presets :func:`weights`,
  :func:`biases`, :func:`all`;
* a pytree of Python bools with the params' structure.

Non-floating leaves are never selected by ``None``, globs or predicates; a bool
pytree that selects one is an error.
"""

from __future__ import annotations

import builtins
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from torch import Tensor

from .tree import Params, PyTree, check_structure, flatten, is_float, spec_names

Predicate: TypeAlias = Callable[[str, Tensor], bool]
Where: TypeAlias = str | Sequence[str] | Predicate | PyTree | None
"""The forms ``where=`` (and an optimizer's ``mask=``) accepts."""

__all__ = ["Predicate", "Where", "all", "biases", "mask", "weights"]


def weights() -> Predicate:
    """Leaves with ``ndim >= 2``: matrices and kernels, not biases or norm scales.

    The usual "no weight decay on biases and LayerNorm" rule.
    """

    def is_weight(name: str, leaf: Tensor) -> bool:
        return leaf.ndim >= 2

    return is_weight


def biases() -> Predicate:
    """Leaves whose last name component is ``bias``."""

    def is_bias(name: str, leaf: Tensor) -> bool:
        return name.rsplit(".", 1)[-1] == "bias"

    return is_bias


def all() -> Predicate:
    """Every floating-point leaf (the same as ``where=None``)."""

    def any_leaf(name: str, leaf: Tensor) -> bool:
        return True

    return any_leaf


def mask(params: Params, where: Where = None) -> PyTree:
    """The selection as a pytree of bools with the structure of ``params``.

    Example:
        >>> import torch
        >>> params = {"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2)}
        >>> mask(params, weights())
        {'0.weight': True, '0.bias': False}
    """
    _leaves, spec = flatten(params)
    return spec.unflatten(selected(params, where))


def selected(params: Params, where: Where) -> list[bool]:
    """Flat list of bools, one per leaf of ``params`` in flattening order."""
    leaves, spec = flatten(params)
    floats = [is_float(leaf) for leaf in leaves]
    if where is None:  # every step of a rule without a mask: no names needed
        return floats
    names = spec_names(spec)
    if isinstance(where, str):
        where = [where]
    if isinstance(where, Sequence) and where and builtins.all(isinstance(w, str) for w in where):
        return list(_match_globs(tuple(names), tuple(floats), tuple(where)))
    if callable(where):
        return [
            is_leaf_float and bool(where(name, leaf))
            for name, leaf, is_leaf_float in zip(names, leaves, floats, strict=True)
        ]
    return _from_bool_tree(params, where, names, leaves, floats)


def _match_globs(
    names: tuple[str, ...], floats: tuple[bool, ...], patterns: tuple[str, ...]
) -> tuple[bool, ...]:
    # A constant for the compiler: dynamo cannot trace fnmatch's regexes.
    float_names = [name for name, is_leaf_float in zip(names, floats, strict=True) if is_leaf_float]
    for pattern in patterns:
        if not fnmatch.filter(float_names, pattern):
            raise ValueError(
                f"where={pattern!r} matches no floating-point leaf; leaf names are "
                + _preview(float_names)
            )
    return tuple(
        is_leaf_float and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        for name, is_leaf_float in zip(names, floats, strict=True)
    )


# A constant for the compiler: what ``torch.compiler.assume_constant_result`` sets, without
# the import of torch._dynamo (about a second) that the decorator makes.
_match_globs._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _from_bool_tree(
    params: Params, where: PyTree, names: list[str], leaves: list[Any], floats: list[bool]
) -> list[bool]:
    flags = check_structure(params, where, other_name="where", check_shapes=False)
    for name, flag, _leaf, is_leaf_float in zip(names, flags, leaves, floats, strict=True):
        if not isinstance(flag, bool):
            raise TypeError(
                f"where must be None, a glob, a list of globs, a predicate or a pytree of "
                f"bools; leaf {name!r} of where is {type(flag).__name__}"
            )
        if flag and not is_leaf_float:
            raise ValueError(f"where selects leaf {name!r}, which is not a floating-point tensor")
    return flags


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"
