"""``where=`` selections: which leaves a penalty, prox, decay or mask applies to.

A selection is one of

* ``None``: every floating-point leaf;
* a glob string or a list of globs on dotted leaf names (``"*.weight"``,
  ``["encoder.*", "head.0.weight"]``); each glob must match a floating-point leaf;
* a predicate ``(name, tensor) -> bool``, e.g. the presets :func:`weights`,
  :func:`biases`, :func:`all`, or the decay rules of the ecosystem for one model,
  :func:`transformers_decay` (``transformers.Trainer``) and :func:`timm_decay` (timm's
  ``no_weight_decay()``);
* a pytree of Python bools with the params' structure.

Non-floating leaves are never selected by ``None``, globs or predicates; a bool
pytree that selects one is an error.
"""

from __future__ import annotations

import builtins
import fnmatch
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeAlias

import torch  # noqa: F401  # the doctests use it
from torch import Tensor, nn

from .tree import Params, PyTree, check_structure, flatten, spec_names

Predicate: TypeAlias = Callable[[str, Tensor], bool]
"""A function ``(name, leaf) -> bool`` of a leaf's dotted name (as in
``model.named_parameters()``) and the tensor, for ``where=`` and ``mask=``."""
Where: TypeAlias = str | Sequence[str] | Predicate | PyTree | None
"""The forms ``where=`` (and an optimizer's ``mask=``) accepts."""

__all__ = [
    "Predicate",
    "Where",
    "all",
    "biases",
    "mask",
    "timm_decay",
    "transformers_decay",
    "weights",
]

# transformers.Trainer.get_decay_parameter_names (transformers 4.50+ and 5.x): no decay
# inside nn.LayerNorm modules, nor where the lower-cased name matches one of these.
_TRANSFORMERS_NO_DECAY = tuple(
    re.compile(pattern)
    for pattern in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)


def weights() -> Predicate:
    """Leaves with ``ndim >= 2``: matrices and kernels, not biases or norm scales.

    The usual "no weight decay on biases and LayerNorm" rule (e.g. nanoGPT's
    ``configure_optimizers``, timm's ``param_groups_weight_decay`` without its name list).

    Returns:
        A :data:`Predicate`.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2)}
        >>> fr.select.mask(params, fr.select.weights())
        {'0.weight': True, '0.bias': False}
    """

    def is_weight(name: str, leaf: Tensor) -> bool:
        return leaf.ndim >= 2

    return is_weight


def biases() -> Predicate:
    """Leaves whose last name component is ``bias``.

    Returns:
        A :data:`Predicate`.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2)}
        >>> fr.select.mask(params, fr.select.biases())
        {'0.weight': False, '0.bias': True}
    """

    def is_bias(name: str, leaf: Tensor) -> bool:
        return name.rsplit(".", 1)[-1] == "bias"

    return is_bias


def all() -> Predicate:
    """Every floating-point leaf (the same as ``where=None``).

    Returns:
        A :data:`Predicate`.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"w": torch.ones(2), "steps": torch.zeros((), dtype=torch.int64)}
        >>> fr.select.mask(params, fr.select.all())
        {'w': True, 'steps': False}
    """

    def any_leaf(name: str, leaf: Tensor) -> bool:
        return True

    return any_leaf


def transformers_decay(model: nn.Module) -> Predicate:
    r"""The parameters ``transformers.Trainer`` decays, for ``mask=`` and ``where=``.

    The same set as ``Trainer.get_decay_parameter_names(model)`` (transformers 4.50+
    and 5.x): every parameter except those inside an ``nn.LayerNorm`` module and those
    whose lower-cased dotted name matches ``bias``, ``layernorm``, ``rmsnorm``,
    ``(^|\.)norm($|\.)`` or ``_norm($|\.)`` (so Llama's RMSNorm weights, T5's
    ``relative_attention_bias`` and every bias are not decayed). Whatever the shape:
    unlike :func:`weights`, embeddings are decayed as the Trainer decays them.

    Args:
        model: the model whose parameters the selection names (a ``torch.compile``\ d
            module is unwrapped). Leaves are matched by their names in
            ``model.named_parameters()`` (or ``fr.split_module(model)``).

    Returns:
        A predicate ``(name, leaf) -> bool``.

    Raises:
        ValueError: when applied, a leaf's name is not a parameter of ``model``.

    Example:
        >>> import functorch_reg as fr
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> params, _ = fr.split_module(net)
        >>> fr.select.mask(params, fr.select.transformers_decay(net))
        {'0.weight': True, '0.bias': False, '1.weight': False, '1.bias': False}
    """
    from .modules import unwrap

    model = unwrap(model)
    inside_layernorm = {
        f"{path}.{name}" if path else name
        for path, module in model.named_modules(remove_duplicate=False)
        if path and isinstance(module, nn.LayerNorm)
        for name, _ in module.named_parameters(remove_duplicate=False)
    }
    decayed = {
        name
        for name, _ in model.named_parameters(remove_duplicate=False)
        if name not in inside_layernorm
        and not builtins.any(p.search(name.lower()) for p in _TRANSFORMERS_NO_DECAY)
    }
    return _named_selection(model, decayed, "transformers_decay")


def timm_decay(model: nn.Module, no_weight_decay: Collection[str] | None = None) -> Predicate:
    r"""The parameters timm's ``create_optimizer_v2`` decays, for ``mask=`` and ``where=``.

    timm's ``param_groups_weight_decay`` decays a parameter unless it is 1-D or 0-D
    (biases, norm scales), its name ends in ``.bias``, or it is named by the model's
    ``no_weight_decay()`` (position embeddings, class tokens, ...); here a name there
    may also be an ``fnmatch`` glob (``"blocks.*.rel_pos"``), as in recent timm.

    Args:
        model: the model whose parameters the selection names (a ``torch.compile``\ d
            module is unwrapped).
        no_weight_decay: the names not to decay; default ``model.no_weight_decay()``
            if the model defines it, else none.

    Returns:
        A predicate ``(name, leaf) -> bool``.

    Raises:
        ValueError: when applied, a leaf's name is not a parameter of ``model``.

    Example:
        >>> import functorch_reg as fr
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 2))
        ...         self.proj = torch.nn.Linear(2, 2)
        ...     def no_weight_decay(self):
        ...         return {"pos_embed"}
        >>> net = Net()
        >>> fr.select.mask(fr.split_module(net)[0], fr.select.timm_decay(net))
        {'pos_embed': False, 'proj.weight': True, 'proj.bias': False}
    """
    from .modules import unwrap

    model = unwrap(model)
    if no_weight_decay is None:
        method = getattr(model, "no_weight_decay", None)
        no_weight_decay = set(method()) if callable(method) else set()
    patterns = tuple(no_weight_decay)
    decayed = {
        name
        for name, p in model.named_parameters(remove_duplicate=False)
        if p.ndim > 1
        and not name.endswith(".bias")
        and not builtins.any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }
    return _named_selection(model, decayed, "timm_decay")


def _named_selection(model: nn.Module, decayed: set[str], preset: str) -> Predicate:
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)}

    def is_decayed(name: str, leaf: Tensor) -> bool:
        if name not in known:
            raise ValueError(
                f"select.{preset}: leaf {name!r} is not a parameter of the "
                f"{type(model).__name__} it was made for; name the params as "
                "model.named_parameters() or fr.split_module(model) does, e.g. "
                + _preview(sorted(known), limit=3)
            )
        return name in decayed

    return is_decayed


def mask(params: Params, where: Where = None) -> PyTree:
    """The selection as a pytree of bools with the structure of ``params``.

    Args:
        params: a pytree of tensors (any shapes and dtypes), e.g. the ``params`` of
            ``fr.split_module(model)``.
        where: a selection: ``None``, a glob or list of globs on dotted leaf names, a
            :data:`Predicate`, or a pytree of bools (see the module docstring).

    Returns:
        A pytree of Python bools with the structure of ``params``; non-floating leaves
        are ``False``.

    Raises:
        ValueError: a glob matches no floating-point leaf; a bool pytree does not have
            the structure of ``params``, or selects a non-floating leaf.
        TypeError: a leaf of a pytree ``where`` is not a bool.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> params = {"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2)}
        >>> fr.select.mask(params, "*.weight")
        {'0.weight': True, '0.bias': False}
    """
    _leaves, spec = flatten(params)
    return spec.unflatten(selected(params, where))


def selected(params: Params, where: Where) -> list[bool]:
    """Flat list of bools, one per leaf of ``params`` in flattening order."""
    leaves, spec = flatten(params)
    floats = [isinstance(leaf, Tensor) and leaf.is_floating_point() for leaf in leaves]
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
