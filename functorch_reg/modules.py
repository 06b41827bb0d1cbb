"""A model as functional state: what trains, what does not, and what its forward returns.

``torch.func.functional_call(model, (params, consts), x)`` runs a module on tensors the
caller owns. :func:`split_module` makes the two dicts: the parameters that train, and the
module's constants (frozen parameters and buffers such as BatchNorm's running
statistics). :func:`unwrap` takes the module out of a ``torch.compile`` wrapper, and
:func:`logits_of` finds the logits in a model's output (a tensor, a dict, a tuple, or a
Hugging Face ``ModelOutput``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["logits_of", "split_module", "unwrap"]

Logits = str | int | Callable[[Any], Tensor] | None
"""Where the logits are in a model's output: ``None`` (the output itself if it is a
tensor, else its ``logits`` attribute or key, else ``None``), an attribute or key name, an
index into a tuple, or a callable ``output -> Tensor``."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile(model)`` wrapper (``_orig_mod``), else ``model``.

    The functional paths compile whole steps themselves; running a compiled module inside
    ``torch.func`` transforms fails, and its parameter names carry an ``_orig_mod.``
    prefix.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> unwrap(torch.compile(net)) is net
        True
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def split_module(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, consts)``: what trains and what does not, for ``functional_call``.

    ``params`` holds the parameters with ``requires_grad=True``; ``consts`` holds the
    frozen parameters (``requires_grad=False``) and every buffer (BatchNorm's running
    statistics and ``num_batches_tracked``), keyed by their names in
    ``model.state_dict()``. All are detached views of the module's own tensors, so an
    in-place step on ``params`` (or a forward that updates ``consts``) updates the module.
    Detaching every parameter instead (``{k: v.detach() for k, v in
    model.named_parameters()}``) would lose ``requires_grad``, and the frozen ones would
    train. A ``torch.compile``d module is unwrapped first (names without ``_orig_mod.``).

    Run the model with ``functional_call(model, (params, consts), args)``.

    Args:
        model: any ``nn.Module``.

    Returns:
        Two dicts of detached tensors: trainable parameters, and frozen parameters plus
        buffers. Tied parameters appear once, under their first name (as in
        ``named_parameters()``).

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> net[0].weight.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter containing:...
        >>> params, consts = fr.split_module(net)
        >>> sorted(params), sorted(consts)  # doctest: +NORMALIZE_WHITESPACE
        (['0.bias', '1.bias', '1.weight'],
         ['0.weight', '1.num_batches_tracked', '1.running_mean', '1.running_var'])
    """
    model = unwrap(model)
    params: dict[str, Tensor] = {}
    consts: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        (params if p.requires_grad else consts)[name] = p.detach()
    for name, b in model.named_buffers():
        consts[name] = b.detach()
    return params, consts


def logits_of(output: Any, where: Logits = None) -> Tensor | None:
    """The logits in a model's output, or ``None`` when they cannot be found.

    Args:
        output: what the model's forward returned.
        where: ``None`` (a tensor output itself, else an attribute or key ``"logits"``),
            an attribute or key name, an index into a tuple or list, or a callable
            ``output -> Tensor``.

    Raises:
        KeyError, AttributeError or IndexError: ``where`` names something the output
            does not have.

    Example:
        >>> import torch
        >>> logits_of({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
        >>> logits_of((torch.ones(1), torch.zeros(2)), where=1)
        tensor([0., 0.])
    """
    if callable(where):
        return where(output)
    if isinstance(where, int):
        return output[where]  # type: ignore[no-any-return]
    if isinstance(where, str):
        if isinstance(output, Mapping):
            return output[where]  # type: ignore[no-any-return]
        return getattr(output, where)  # type: ignore[no-any-return]
    if isinstance(output, Tensor):
        return output
    # ModelOutput is both a Mapping and an object with attributes.
    mapping = isinstance(output, Mapping)
    found = output.get("logits") if mapping else getattr(output, "logits", None)
    return found if isinstance(found, Tensor) else None
