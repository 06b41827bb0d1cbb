"""The buffers of ``TorchOptimizer(flat=True)``: a param group's params, gradients and
optimizer state each live in one contiguous buffer, and the per-param tensors that
modules, autograd and ``state_dict`` see are views of them.

:class:`FlatBuffers` packs the params and keeps them views of their buffer;
:class:`functorch_reg._adapter_groups.FlatGroup` keeps the group's optimizer state over it.

Backward accumulates into ``.grad`` in place once it is defined, so setting each
``p.grad`` to a view of one gradient buffer makes the whole group's gradient flat
without a copy; the step then runs one kernel per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .flat import FlatParams, pack
from .tree import is_dtensor

__all__ = ["FlatBuffers", "FlatGroup"]


class FlatBuffers:
    """One param group packed into buffers: ``params`` and ``grads`` (1-D tensors).

    Packing re-points every ``p.data`` at a view of ``params`` and every ``p.grad`` at a
    view of ``grads`` (an existing gradient is copied in). :meth:`refresh` repairs
    params or gradients that were re-pointed since (``p.data = ...`` of the same dtype,
    device and shape, ``p.grad = ...``, ``zero_grad(set_to_none=True)`` from other
    code), copying their values in; a param whose dtype, device or shape changed
    (``model.double()``, ``model.to("cuda")``) is refused, as torch.optim would fail.
    """

    def __init__(
        self, params: Sequence[Tensor], label: str, names: Sequence[str] | None = None
    ) -> None:
        for position, p in enumerate(params):
            if is_dtensor(p):
                raise ValueError(
                    f"TorchOptimizer(flat=True): {label} holds a DTensor (param {position}); "
                    "sharded params (FSDP2) keep the per-leaf layout: use flat=False"
                )
            if p.dtype != params[0].dtype or p.device != params[0].device:
                raise ValueError(
                    f"TorchOptimizer(flat=True): {label} mixes {params[0].dtype} on "
                    f"{params[0].device} with {p.dtype} on {p.device} (param {position}); "
                    "a flat group needs one dtype and device: split it into param groups"
                )
        self.members = list(params)
        """The packed params, in order."""
        self.label = label
        # Leaf names for the optimizer's mask and prox: the param names when the group
        # has them, else positions.
        self.names = list(names) if names is not None else [f"{i:06d}" for i in range(len(params))]
        try:
            self.layout: FlatParams = pack(
                dict(zip(self.names, (p.detach() for p in params), strict=True))
            )
        except ValueError as error:
            raise ValueError(f"TorchOptimizer(flat=True), {label}: {error}") from None
        (self.key,) = self.layout.buffers
        self.params = self.layout.buffers[self.key]
        self.grads = torch.zeros_like(self.params)
        self._param_views = [self.layout.params[name] for name in self.names]
        self._grad_views = self.views(self.grads)
        self._pointers = [view.data_ptr() for view in self._param_views]
        for p, grad in zip(params, self._grad_views, strict=True):
            if p.grad is not None:
                grad.copy_(p.grad)
        self.refresh(params)

    def views(self, buffer: Tensor) -> list[Tensor]:
        """Per-param views of a buffer laid out like :attr:`params`."""
        views = self.layout.unpack({self.key: buffer})
        return [views[name] for name in self.names]

    def pack(self, tensors: Sequence[Tensor]) -> Tensor:
        """A new buffer holding one tensor per param, laid out like :attr:`params`."""
        packed = self.layout.pack_like(dict(zip(self.names, tensors, strict=True)))[self.key]
        assert packed is not None
        return packed

    def refresh(self, params: Sequence[Tensor]) -> None:
        """Make every param and gradient a view of the buffers again, keeping values."""
        if [p.data_ptr() for p in params] == self._pointers and all(
            p.grad is grad for p, grad in zip(params, self._grad_views, strict=True)
        ):
            return  # the usual case, checked cheaply: a step of a big model runs in ~1 ms
        for position, (p, view) in enumerate(zip(params, self._param_views, strict=True)):
            if p.dtype != view.dtype or p.device != view.device or p.shape != view.shape:
                # Copying the new values into the old buffer would silently undo
                # model.double() or model.to(device).
                raise ValueError(
                    f"TorchOptimizer(flat=True): param {position} of {self.label} is now "
                    f"{p.dtype} {tuple(p.shape)} on {p.device}, but was packed as "
                    f"{view.dtype} {tuple(view.shape)} on {view.device} (model.to(), "
                    ".double() or .half() after the optimizer was made); make the "
                    "optimizer after moving or casting the model, as with torch.optim"
                )
        with torch.no_grad():
            for p, view, grad in zip(params, self._param_views, self._grad_views, strict=True):
                if not _same_view(p, view):
                    view.copy_(p)
                    p.data = view
                if p.grad is None:
                    grad.zero_()
                    p.grad = grad
                elif not _same_view(p.grad, grad):
                    grad.copy_(p.grad)
                    p.grad = grad


def _same_view(tensor: Tensor, view: Tensor) -> bool:
    return (
        tensor.data_ptr() == view.data_ptr()
        and tensor.shape == view.shape
        and tensor.stride() == view.stride()
    )


FlatGroup = FlatBuffers
"""The former name of :class:`FlatBuffers` (a param group's storage is now
:class:`functorch_reg._adapter_groups.FlatGroup`, which holds one)."""
