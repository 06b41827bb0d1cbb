"""In-place safety: whether a set of tensors can each take a new value in place."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .tree import address_span, is_dtensor

__all__ = ["check_writable"]


def check_writable(
    owner: str, targets: Sequence[Tensor], label: Callable[[int], str], pure: str
) -> None:
    """Raise unless every tensor of ``targets`` can be written in place, alone.

    ``label(i)`` names target ``i`` in an error (built only then).

    Refused, naming the label and saying what to do: an inference tensor (outside
    inference mode), a tensor with overlapping memory (``expand()``), and two targets
    that share an element (tied weights, a view of another target). ``pure`` names the
    out-of-place alternative the errors suggest (``"step()"``). Memory is not inspected
    under ``torch.compile``, ``vmap`` or ``grad``.
    """
    if not targets or torch.compiler.is_compiling():
        return
    if torch._C._functorch.is_functorch_wrapped_tensor(targets[0]):
        return
    inference_mode = torch.is_inference_mode_enabled()
    spans = []
    for index, tensor in enumerate(targets):
        if is_dtensor(tensor):
            tensor = cast(Any, tensor).to_local()
        if tensor.is_inference() and not inference_mode:
            raise ValueError(
                f"{owner}: {label(index)} is an inference tensor (made under "
                "torch.inference_mode()), which cannot be updated in place; clone it "
                f"outside inference mode, or use {pure}"
            )
        if not tensor.is_contiguous() and torch._debug_has_internal_overlap(tensor) == 1:
            raise ValueError(
                f"{owner}: {label(index)} has overlapping memory (e.g. made by expand()), so an "
                "in-place update is ambiguous; pass a contiguous copy (.contiguous()), or "
                f"use {pure}"
            )
        if tensor.numel() and tensor.device.type != "meta":
            start, end = address_span(tensor)
            device = (tensor.device.type, tensor.device.index or 0)
            spans.append((device, start, end, index, tensor))
    # Memory that two tensors share lies in both of their address spans: sorted by
    # start, a span can only meet the earlier spans that have not ended yet.
    spans.sort(key=lambda span: (span[0], span[1]))
    active: list[tuple[Any, ...]] = []
    for span in spans:
        device, start = span[0], span[1]
        active = [other for other in active if other[0] == device and other[2] > start]
        for other in active:
            if _share_elements(other[4], span[4]):
                first, second = sorted([other[3], span[3]])
                raise ValueError(
                    f"{owner}: {label(first)} and {label(second)} share memory "
                    "(tied weights, or a view of another leaf), so one in-place update "
                    f"would overwrite the other; keep one of them, or use {pure}"
                )
        active.append(span)


def _share_elements(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors whose address spans meet share an element."""
    size = a.element_size()
    base = min(a.data_ptr(), b.data_ptr())
    offsets = [(t.data_ptr() - base) for t in (a, b)]
    if b.element_size() != size or any(offset % size for offset in offsets):
        return True
    # Interleaved spans (the columns of a matrix): mark one tensor's elements.
    end = max(address_span(a)[1], address_span(b)[1])
    marks = torch.zeros((end - base) // size, dtype=torch.bool, device=a.device)
    marks.as_strided(a.shape, a.stride(), offsets[0] // size).fill_(True)
    return bool(marks.as_strided(b.shape, b.stride(), offsets[1] // size).any())
