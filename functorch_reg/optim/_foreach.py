"""A list of tensors with tensor arithmetic, so that one rule runs over many leaves at once.

An update rule is written once, for one array (:class:`~functorch_reg.optim.base.LeafRule`).
Outside ``torch.compile``, :func:`~functorch_reg.optim.base.build` runs that same rule over
a :class:`TensorList` of all the leaves that share a dtype and a device: each operator
becomes one ``torch._foreach_*`` call over the list (one dispatch, and on CUDA one
launch, instead of one per leaf), and any other ``torch`` function or ``Tensor`` method
is applied leaf by leaf. Every op computes what the per-leaf op computes on each leaf
(the same kernel, type promotion and rounding), so the grouped step equals the per-leaf
one bit for bit on CPU.

Only what is the same for every leaf can be read in Python: scalars, and the results of
ops. Per-leaf metadata (``shape``, ``ndim``, ``.dim()``) and truth values raise
:class:`NotElementwiseError`, and the caller runs the per-leaf rule instead, so a rule whose
math depends on a leaf's shape (Muon's matrices, Adafactor's factored moments) stays
correct, at per-leaf speed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["NotElementwiseError", "Rows", "TensorList"]


class NotElementwiseError(TypeError):
    """The rule asked a :class:`TensorList` something that differs from leaf to leaf."""


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool)) and not isinstance(value, Tensor)


class TensorList:
    """Tensors that act like one tensor: ``a + b`` adds leaf by leaf.

    Operands may be a :class:`TensorList` of the same length, a Python number or a
    tensor (broadcast to every leaf, as a 0-d hyperparameter is).

    Example:
        >>> import torch
        >>> from functorch_reg.optim._foreach import TensorList
        >>> x = TensorList([torch.ones(2), torch.zeros(3)])
        >>> (2 * x + 1).tensors
        [tensor([3., 3.]), tensor([1., 1., 1.])]
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        self.tensors: list[Tensor] = list(tensors)

    # A rule's len(x) or iteration means the leaf's rows, not the leaves.
    def __len__(self) -> int:
        raise NotElementwiseError("len() of a TensorList differs from leaf to leaf")

    def __iter__(self) -> Iterator[Tensor]:
        raise NotElementwiseError("iterating a TensorList means each leaf's rows")

    def __getitem__(self, index: Any) -> TensorList:
        return _map(Tensor.__getitem__, (self, index), {})

    def __repr__(self) -> str:
        return f"TensorList({self.tensors!r})"

    # Anything that would need one answer for all leaves.
    def __bool__(self) -> bool:
        raise NotElementwiseError("the truth value of a TensorList differs from leaf to leaf")

    def __getattr__(self, name: str) -> Any:
        if name in ("dtype", "device"):
            # The same for every leaf of a group, which shares one dtype and device.
            values = {getattr(tensor, name) for tensor in self.tensors}
            if len(values) == 1:
                return values.pop()
        attribute = getattr(Tensor, name, None)
        if name.startswith("__") or not callable(attribute):
            raise NotElementwiseError(f"Tensor.{name} differs from leaf to leaf")
        method: Callable[..., Any] = attribute

        def per_leaf(*args: Any, **kwargs: Any) -> TensorList:
            return _map(method, (self, *args), kwargs)

        return per_leaf

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        fast = _TORCH_FAST.get(func)
        if fast is not None and not kwargs:
            result = fast(*args)
            if result is not NotImplemented:
                return result
        return _map(func, args, kwargs or {})

    # Arithmetic: one foreach call where torch has one, else leaf by leaf.
    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.tensors))

    def __add__(self, other: Any) -> TensorList:
        return _binary(torch._foreach_add, torch.add, self, other)

    def __radd__(self, other: Any) -> TensorList:
        # Addition commutes bit for bit (IEEE), so other + self == self + other.
        return _binary(torch._foreach_add, torch.add, self, other)

    def __sub__(self, other: Any) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_sub(self.tensors, _check_length(self, other)))
        if _is_scalar(other):
            return TensorList(torch._foreach_sub(self.tensors, other))
        return _map(torch.sub, (self, other), {})

    def __rsub__(self, other: Any) -> TensorList:
        # other - x == (-x) + other exactly: negation is exact and addition commutes.
        if _is_scalar(other):
            return TensorList(torch._foreach_add(torch._foreach_neg(self.tensors), other))
        return _map(torch.sub, (other, self), {})

    def __mul__(self, other: Any) -> TensorList:
        return _binary(torch._foreach_mul, torch.mul, self, other)

    def __rmul__(self, other: Any) -> TensorList:
        return _binary(torch._foreach_mul, torch.mul, self, other)

    def __truediv__(self, other: Any) -> TensorList:
        return _binary(torch._foreach_div, torch.div, self, other)

    def __rtruediv__(self, other: Any) -> TensorList:
        return _map(torch.div, (other, self), {})

    def __pow__(self, other: Any) -> TensorList:
        return _binary(torch._foreach_pow, torch.pow, self, other)

    def __abs__(self) -> TensorList:
        return TensorList(torch._foreach_abs(self.tensors))

    def __ge__(self, other: Any) -> TensorList:  # type: ignore[override]
        return _map(torch.ge, (self, other), {})

    def __gt__(self, other: Any) -> TensorList:  # type: ignore[override]
        return _map(torch.gt, (self, other), {})

    def __le__(self, other: Any) -> TensorList:  # type: ignore[override]
        return _map(torch.le, (self, other), {})

    def __lt__(self, other: Any) -> TensorList:  # type: ignore[override]
        return _map(torch.lt, (self, other), {})

    def __eq__(self, other: Any) -> TensorList:  # type: ignore[override]
        return _map(torch.eq, (self, other), {})

    def __ne__(self, other: Any) -> TensorList:  # type: ignore[override]
        return _map(torch.ne, (self, other), {})

    def __and__(self, other: Any) -> TensorList:
        return _map(torch.logical_and, (self, other), {})

    def __or__(self, other: Any) -> TensorList:
        return _map(torch.logical_or, (self, other), {})

    def __invert__(self) -> TensorList:
        return _map(torch.bitwise_not, (self,), {})

    __hash__ = None  # type: ignore[assignment]

    def sqrt(self) -> TensorList:
        return TensorList(torch._foreach_sqrt(self.tensors))

    def sign(self) -> TensorList:
        return TensorList(torch._foreach_sign(self.tensors))


class Rows(TensorList):
    """The rows of a leaf table for a group of leaves (``row`` of a :class:`LeafRule`).

    Kept as one ``[n, *row]`` tensor, so that ``unbind()`` (a row's values, one per
    field) splits all the leaves' rows with two calls rather than one per leaf.
    """

    __slots__ = ("table",)

    def __init__(self, table: Tensor) -> None:
        super().__init__(table.unbind(0))
        self.table = table

    def unbind(self, dim: int = 0) -> tuple[TensorList, ...]:
        if dim != 0:
            raise NotElementwiseError("Rows.unbind splits a row into its fields (dim=0) only")
        return tuple(TensorList(column.unbind(0)) for column in self.table.unbind(1))


def _check_length(a: TensorList, b: TensorList) -> list[Tensor]:
    if len(a.tensors) != len(b.tensors):
        raise ValueError(f"TensorLists of {len(a.tensors)} and {len(b.tensors)} tensors")
    return b.tensors


def _binary(
    foreach: Callable[..., list[Tensor]],
    single: Callable[..., Tensor],
    a: TensorList,
    b: Any,
) -> TensorList:
    if isinstance(b, TensorList):
        return TensorList(foreach(a.tensors, _check_length(a, b)))
    if _is_scalar(b):
        return TensorList(foreach(a.tensors, b))
    if isinstance(b, Tensor) and foreach is not torch._foreach_pow:
        # _foreach_*.Tensor broadcasts one tensor (a 0-d hyperparameter) to every leaf,
        # with the promotion of the per-leaf op (a 0-d float64 tensor keeps fp32 leaves
        # fp32, and promotes a 0-d fp32 leaf).
        return TensorList(foreach(a.tensors, b))
    return _map(single, (a, b), {})


def _map(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``func`` leaf by leaf; every :class:`TensorList` argument must have one length."""
    lengths = {len(arg.tensors) for arg in (*args, *kwargs.values()) if isinstance(arg, TensorList)}
    if len(lengths) != 1:
        raise ValueError(f"TensorLists of different lengths: {sorted(lengths)}")
    (n,) = lengths

    def pick(value: Any, i: int) -> Any:
        if isinstance(value, TensorList):
            return value.tensors[i]
        if isinstance(value, (list, tuple)) and any(isinstance(v, TensorList) for v in value):
            return type(value)(pick(v, i) for v in value)
        return value

    results = [
        func(*(pick(arg, i) for arg in args), **{k: pick(v, i) for k, v in kwargs.items()})
        for i in range(n)
    ]
    if all(isinstance(result, Tensor) for result in results):
        return TensorList(results)
    if results and all(
        isinstance(result, tuple) and all(isinstance(x, Tensor) for x in result)
        for result in results
    ):
        return tuple(TensorList(column) for column in zip(*results, strict=True))
    raise NotElementwiseError(f"{getattr(func, '__name__', func)} gives a non-tensor per leaf")


def _maximum(a: Any, b: Any) -> Any:
    if isinstance(a, TensorList) and isinstance(b, TensorList):
        return TensorList(torch._foreach_maximum(a.tensors, _check_length(a, b)))
    return NotImplemented


def _sqrt(a: Any) -> Any:
    return (
        TensorList(torch._foreach_sqrt(a.tensors)) if isinstance(a, TensorList) else NotImplemented
    )


_TORCH_FAST: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.maximum: _maximum,
    torch.sqrt: _sqrt,
}
