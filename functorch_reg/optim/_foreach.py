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

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor

__all__ = ["Layout", "NotElementwiseError", "Rows", "TensorList", "layout_of"]


class NotElementwiseError(TypeError):
    """The rule asked a :class:`TensorList` something that differs from leaf to leaf."""


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool)) and not isinstance(value, Tensor)


class Layout:
    """A token for the leaf shapes and dtype of one group: lists that carry the same
    token hold, position by position, tensors of one shape, with one floating dtype
    and at least one dimension (so a 0-d operand never promotes them)."""

    __slots__ = ()


SCALARS = "scalars"
"""The layout of a list of 0-d tensors (a table's per-leaf values)."""


def layout_of(tensors: Sequence[Tensor]) -> Layout | None:
    """A fresh :class:`Layout` for a group's leaves, or ``None`` when they do not fit
    one (a 0-d leaf, mixed dtypes, a non-float leaf)."""
    if not tensors:
        return None
    dtype = tensors[0].dtype
    if not dtype.is_floating_point or any(t.dtype != dtype or t.dim() == 0 for t in tensors):
        return None
    return Layout()


class TensorList:
    """Tensors that act like one tensor: ``a + b`` adds leaf by leaf.

    Operands may be a :class:`TensorList` of the same length, a Python number or a
    tensor (broadcast to every leaf, as a 0-d hyperparameter is).

    A temporary result (made by an op here and referenced by nothing else, as in
    ``(g - m) * c``) is reused for the next op's result, in place, where that gives
    the same values, dtype and shape: an expression allocates once, not once per op.

    Example:
        >>> import torch
        >>> from functorch_reg.optim._foreach import TensorList
        >>> x = TensorList([torch.ones(2), torch.zeros(3)])
        >>> (2 * x + 1).tensors
        [tensor([3., 3.]), tensor([1., 1., 1.])]
    """

    __slots__ = ("donated", "layout", "owned", "tensors")

    def __init__(
        self, tensors: Iterable[Tensor], layout: Layout | str | None = None, owned: bool = False
    ) -> None:
        self.tensors: list[Tensor] = list(tensors)
        self.layout = layout
        self.owned = owned  # the tensors were made by an op here, for this list only
        # The caller's storage, which the first fused method called on this list (mul,
        # add, lerp, addcmul, addcdiv) may overwrite: set by step_ for a rule that never
        # reads an input again after calling such a method on it (see base.build).
        self.donated = False

    # A rule's len(x) or iteration means the leaf's rows, not the leaves.
    def __len__(self) -> int:
        raise NotElementwiseError("len() of a TensorList differs from leaf to leaf")

    def __iter__(self) -> Iterator[Tensor]:
        raise NotElementwiseError("iterating a TensorList means each leaf's rows")

    def __getitem__(self, index: Any) -> Any:
        return _map(Tensor.__getitem__, (self, index), {})

    def __repr__(self) -> str:
        return f"TensorList({self.tensors!r})"

    # Anything that would need one answer for all leaves.
    def __bool__(self) -> bool:
        raise NotElementwiseError("the truth value of a TensorList differs from leaf to leaf")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            # Python's protocols (and Dynamo, which reads __dict__) ask for dunders that
            # a TensorList has not: say so as Python would.
            raise AttributeError(name)
        if name in ("dtype", "device"):
            # The same for every leaf of a group, which shares one dtype and device.
            values = {getattr(tensor, name) for tensor in self.tensors}
            if len(values) == 1:
                return values.pop()
        attribute = getattr(Tensor, name, None)
        if not callable(attribute):
            raise NotElementwiseError(f"Tensor.{name} differs from leaf to leaf")
        method: Callable[..., Any] = attribute

        def per_leaf(*args: Any, **kwargs: Any) -> Any:
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

    # Arithmetic: one foreach call where torch has one, else leaf by leaf. Each operator
    # first reads whether its operands are temporaries (see _TEMPORARY).
    def __neg__(self) -> TensorList:
        return _unary("neg", self, sys.getrefcount(self) <= _TEMPORARY[0])

    def __abs__(self) -> TensorList:
        return _unary("abs", self, sys.getrefcount(self) <= _TEMPORARY[0])

    def sqrt(self) -> TensorList:
        return _unary("sqrt", self, sys.getrefcount(self) <= _TEMPORARY[0])

    def sign(self) -> TensorList:
        return _unary("sign", self, sys.getrefcount(self) <= _TEMPORARY[0])

    def __add__(self, other: Any) -> Any:
        temps = sys.getrefcount(self) <= _TEMPORARY[0], sys.getrefcount(other) <= _TEMPORARY[1]
        return _binary("add", self, other, *temps)

    def __radd__(self, other: Any) -> Any:
        # Addition commutes bit for bit (IEEE), so other + self == self + other.
        temps = sys.getrefcount(self) <= _TEMPORARY[0], False
        return _binary("add", self, other, *temps)

    def __sub__(self, other: Any) -> Any:
        temps = sys.getrefcount(self) <= _TEMPORARY[0], sys.getrefcount(other) <= _TEMPORARY[1]
        return _binary("sub", self, other, *temps)

    def __rsub__(self, other: Any) -> Any:
        # other - x == (-x) + other exactly: negation is exact and addition commutes.
        if _is_scalar(other):
            negated = _unary("neg", self, sys.getrefcount(self) <= _TEMPORARY[0])
            return _binary("add", negated, other, True, False)
        return _map(torch.sub, (other, self), {})

    def __mul__(self, other: Any) -> Any:
        temps = sys.getrefcount(self) <= _TEMPORARY[0], sys.getrefcount(other) <= _TEMPORARY[1]
        return _binary("mul", self, other, *temps)

    def __rmul__(self, other: Any) -> Any:
        temps = sys.getrefcount(self) <= _TEMPORARY[0], False
        return _binary("mul", self, other, *temps)

    def __truediv__(self, other: Any) -> Any:
        temps = sys.getrefcount(self) <= _TEMPORARY[0], sys.getrefcount(other) <= _TEMPORARY[1]
        return _binary("div", self, other, *temps)

    def __rtruediv__(self, other: Any) -> Any:
        return _map(torch.div, (other, self), {})

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """``Tensor.to`` leaf by leaf; a list of real 0-d tensors stays one (a row
        cast to the leaves' dtype still broadcasts without promoting them)."""
        result = _map(Tensor.to, (self, *args), kwargs)
        if self.layout == SCALARS and all(
            t.dim() == 0 and not t.is_complex() for t in result.tensors
        ):
            result.layout = SCALARS
        return result

    # The fused elementwise methods a rule calls on a Tensor, as one foreach call each.
    def mul(self, other: Any) -> Any:
        temps = sys.getrefcount(self) <= _METHOD_TEMPORARY[0] or self.donated, False
        return _binary("mul", self, other, *temps)

    def add(self, other: Any, *, alpha: Any = 1) -> Any:
        temporary = sys.getrefcount(self) <= _METHOD_TEMPORARY[0] or self.donated
        if _is_scalar(alpha) and alpha == 1:
            return _binary("add", self, other, temporary, False)
        if not isinstance(other, TensorList) or not _is_scalar(alpha):
            return _map(Tensor.add, (self, other), {"alpha": alpha})
        return _fused("add", self, (other,), {"alpha": alpha}, temporary)

    def lerp(self, end: Any, weight: Any) -> Any:
        """``self + weight * (end - self)``, as ``Tensor.lerp``."""
        temporary = sys.getrefcount(self) <= _METHOD_TEMPORARY[0] or self.donated
        if isinstance(weight, Tensor) and weight.dim() == 0:
            weight = TensorList([weight] * len(self.tensors), SCALARS)
        if not _is_scalar(weight) and not isinstance(weight, TensorList):
            return _map(Tensor.lerp, (self, end, weight), {})
        return _fused("lerp", self, (end, weight), {}, temporary)

    def addcmul(self, tensor1: Any, tensor2: Any, *, value: Any = 1) -> Any:
        """``self + value * tensor1 * tensor2``, as ``Tensor.addcmul``."""
        temporary = sys.getrefcount(self) <= _METHOD_TEMPORARY[0] or self.donated
        return _fused("addcmul", self, (tensor1, tensor2), {"value": value}, temporary)

    def addcdiv(self, tensor1: Any, tensor2: Any, *, value: Any = 1) -> Any:
        """``self + value * tensor1 / tensor2``, as ``Tensor.addcdiv``."""
        temporary = sys.getrefcount(self) <= _METHOD_TEMPORARY[0] or self.donated
        if isinstance(tensor1, _Scaled) and isinstance(tensor2, TensorList) and value in (1, -1):
            return _scaled_addcdiv(self, tensor1, tensor2, value, temporary)
        return _fused("addcdiv", self, (tensor1, tensor2), {"value": value}, temporary)

    def __pow__(self, other: Any) -> Any:
        return _binary("pow", self, other, False, False)

    def __ge__(self, other: Any) -> Any:
        return _map(torch.ge, (self, other), {})

    def __gt__(self, other: Any) -> Any:
        return _map(torch.gt, (self, other), {})

    def __le__(self, other: Any) -> Any:
        return _map(torch.le, (self, other), {})

    def __lt__(self, other: Any) -> Any:
        return _map(torch.lt, (self, other), {})

    def __eq__(self, other: Any) -> Any:
        return _map(torch.eq, (self, other), {})

    def __ne__(self, other: Any) -> Any:
        return _map(torch.ne, (self, other), {})

    def __and__(self, other: Any) -> Any:
        return _map(torch.logical_and, (self, other), {})

    def __or__(self, other: Any) -> Any:
        return _map(torch.logical_or, (self, other), {})

    def __invert__(self) -> Any:
        return _map(torch.bitwise_not, (self,), {})

    __hash__ = None  # type: ignore[assignment]


class _TableValues(TensorList):
    """A group's entries of a leaf table: the slices along dim 0 of one tensor ``whole``,
    split off only when read as ``tensors`` (a rule that reads a 2-D table through
    ``unbind()``, or AdamW's step sizes as numbers, never needs them).

    A 1-D ``whole`` holds one 0-d value per leaf (a table column, float64): an op with a
    float32 or float64 leaf list reads them cast to the leaves' dtype, cast once for the
    list (:func:`_operand`), where the op on each leaf would cast its 0-d operand itself.
    Ops among the values keep their dtype, as the per-leaf rule's do."""

    __slots__ = ("casts", "whole")

    def __init__(self, whole: Tensor) -> None:
        self.layout = SCALARS if whole.dim() == 1 else None
        self.owned = self.donated = False
        self.whole = whole
        self.casts: dict[torch.dtype, list[Tensor]] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "tensors":
            self.tensors = list(self.whole.unbind(0))
            return self.tensors
        return super().__getattr__(name)

    def cast_to(self, dtype: torch.dtype) -> list[Tensor]:
        if dtype not in self.casts:
            self.casts[dtype] = list(self.whole.to(dtype).unbind(0))
        return self.casts[dtype]


class Rows(_TableValues):
    """The rows of a leaf table for a group of leaves (``row`` of a :class:`LeafRule`).

    Kept as one ``[n, *row]`` tensor, so that ``unbind()`` (a row's values, one per
    field) splits all the leaves' rows with two calls rather than one per leaf.
    """

    __slots__ = ()

    def unbind(self, dim: int = 0) -> tuple[TensorList, ...]:
        if dim != 0 or self.whole.dim() != 2:
            raise NotElementwiseError("Rows.unbind splits a row into its fields (dim=0) only")
        return tuple(_Column(column) for column in self.whole.unbind(1))


class _Column(_TableValues):
    """One field of a group's rows, whose values a CPU table also gives as Python
    numbers in one call."""

    __slots__ = ()


def _operand(a: TensorList, b: TensorList) -> list[Tensor]:
    """``b``'s tensors as the operand of an element-wise op with ``a``: a table's values
    cast to ``a``'s leaf dtype when that is float32 or float64, the cast each leaf's op
    would make (half precision kernels read a scalar operand at their own precision,
    so they get the values as they are)."""
    tensors = _check_length(a, b)
    if not (isinstance(b, _TableValues) and b.whole.dim() == 1):
        return tensors
    if not isinstance(a.layout, Layout) or not b.whole.is_floating_point():
        return tensors
    dtype = a.tensors[0].dtype
    if dtype == b.whole.dtype or dtype not in (torch.float32, torch.float64):
        return tensors
    return b.cast_to(dtype)


class _Scaled(TensorList):
    """``base * scale`` for a leaf list and a :class:`_Column` on the CPU, made only when
    read: ``p.addcdiv(base * scale, d, value=±1)`` becomes one foreach ``addcdiv`` with
    the column's values as its per-leaf ``value`` (torch.optim's form), no product in
    memory. The same bits in float32 and float64: the kernel computes ``p + (value *
    t1) / t2``, and ``(-s) * m == -(m * s)`` exactly; half precision, which rounds
    ``m * s`` to its own precision first, never gets here."""

    __slots__ = ("base", "scale")

    def __init__(self, base: TensorList, scale: _Column, layout: Layout) -> None:
        # Holding base keeps its reference count above a temporary's, so no op writes
        # into it before the product is read; a donated base never gets here.
        self.layout, self.owned, self.donated = layout, True, False
        self.base, self.scale = base, scale

    def __getattr__(self, name: str) -> Any:
        if name == "tensors":  # read other than by addcdiv: the product, as _binary's
            self.tensors = list(
                torch._foreach_mul(self.base.tensors, _operand(self.base, self.scale))
            )
            return self.tensors
        return super().__getattr__(name)


def _scalable(a: TensorList, b: Any, layout: Layout | str | None) -> bool:
    """Whether ``a * b`` may wait as a :class:`_Scaled`."""
    return (
        isinstance(b, _Column)
        and isinstance(layout, Layout)
        and not a.donated
        and b.whole.device.type == "cpu"
        and a.tensors[0].dtype in (torch.float32, torch.float64)
    )


def _scaled_addcdiv(
    a: TensorList, scaled: _Scaled, tensor2: TensorList, value: int, temporary: bool
) -> TensorList:
    """``a.addcdiv(scaled, tensor2, value=value)`` with ``value`` 1 or -1, as one foreach
    call with per-leaf values (see :class:`_Scaled`)."""
    base = _check_length(a, scaled.base)
    denominators = _check_length(a, tensor2)
    scalars = [value * s for s in scaled.scale.whole.tolist()]
    layout = _result_layout(_token(_result_layout(a, scaled)), tensor2)
    if isinstance(layout, Layout) and temporary and (a.owned or a.donated) and a.layout is layout:
        torch._foreach_addcdiv_(a.tensors, base, denominators, scalars)
        return _written(a)
    result = torch._foreach_addcdiv(a.tensors, base, denominators, scalars)
    return TensorList(result, layout, owned=True)


class _Probe:
    """Stands in for a TensorList operand to measure :data:`_TEMPORARY`."""

    def __mul__(self, other: Any) -> tuple[int, int]:
        return sys.getrefcount(self), sys.getrefcount(other)

    def mul(self, other: Any) -> tuple[int, int]:
        return sys.getrefcount(self), sys.getrefcount(other)


def _measure_temporaries() -> tuple[int, int]:
    """The reference counts that an operator's ``self`` and ``other`` have when they are
    temporaries (referenced by the interpreter's stack only), measured on this
    interpreter; ``(-1, -1)`` (never temporary) when a named operand counts no more."""
    temporary = _Probe() * _Probe()
    left, right = _Probe(), _Probe()
    named = left * right
    if temporary[0] >= named[0] or temporary[1] >= named[1]:
        return -1, -1
    return temporary


def _measure_method_temporaries() -> tuple[int, int]:
    """As :func:`_measure_temporaries`, for a method call ``a.mul(b)``."""
    temporary = _Probe().mul(_Probe())
    left, right = _Probe(), _Probe()
    named = left.mul(right)
    if temporary[0] >= named[0] or temporary[1] >= named[1]:
        return -1, -1
    return temporary


_TEMPORARY = list(_measure_temporaries())
_METHOD_TEMPORARY = list(_measure_method_temporaries())


def remeasure_temporaries() -> None:
    """Measure :data:`_TEMPORARY` again, for the interpreter as it runs now.

    Called before each grouped rule: the counts are not a constant of the interpreter.
    After ``torch.compile`` has failed on a frame, every call's operands count one more
    reference (measured on torch 2.13, CPython 3.11). Counts taken at import would then
    find no temporary (safe, but every op allocates); counts taken in that state and
    read after it changed back would take a named operand for a temporary and
    overwrite it."""
    _TEMPORARY[:] = _measure_temporaries()
    _METHOD_TEMPORARY[:] = _measure_method_temporaries()


def _check_length(a: TensorList, b: TensorList) -> list[Tensor]:
    if len(a.tensors) != len(b.tensors):
        raise ValueError(f"TensorLists of {len(a.tensors)} and {len(b.tensors)} tensors")
    return b.tensors


def _layout(x: Any) -> Layout | str | None:
    if isinstance(x, TensorList):
        return x.layout
    if _is_scalar(x) or (isinstance(x, Tensor) and x.dim() == 0 and not x.is_complex()):
        return SCALARS
    return None


def _result_layout(a: Any, b: Any) -> Layout | str | None:
    """The layout of an element-wise op's result on ``a`` and ``b``: a leaf layout
    survives ops with the same layout and with real scalars (which neither promote nor
    broadcast it)."""
    la, lb = _layout(a), _layout(b)
    if isinstance(la, Layout) and lb in (la, SCALARS):
        return la
    if isinstance(lb, Layout) and la == SCALARS:
        return lb
    return None


def _unary(name: str, a: TensorList, temporary: bool) -> TensorList:
    if temporary and a.owned and isinstance(a.layout, Layout):
        getattr(torch, f"_foreach_{name}_")(a.tensors)
        return a
    return TensorList(getattr(torch, f"_foreach_{name}")(a.tensors), a.layout, owned=True)


_SINGLE: dict[str, Callable[..., Any]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
}


_HALF = (torch.float16, torch.bfloat16)
"""Where ``torch._foreach_mul_(tensors, number)`` rounds otherwise than ``t.mul(number)``
(torch 2.13, CPU: about a third of bfloat16 elements differ in the last bit), so a product
by a number is made out of place, as ``_foreach_mul`` rounds as ``t.mul`` does."""


def _binary(name: str, a: TensorList, b: Any, a_temporary: bool, b_temporary: bool) -> Any:
    """``a <op> b``, in place in a temporary operand where that computes the same."""
    if isinstance(b, TensorList):
        other: Any = _operand(a, b)
    elif _is_scalar(b) or (isinstance(b, Tensor) and name != "pow"):
        other = b
    else:
        return _map(_SINGLE[name], (a, b), {})
    if name == "sub" and isinstance(b, Tensor):
        # There is no _foreach_sub with a tensor operand: x - t == x + (-t) exactly.
        name, other = "add", -b
    layout = _result_layout(a, b)
    if isinstance(layout, Layout):
        if (
            a_temporary
            and (a.owned or a.donated)
            and a.layout is layout
            and name != "pow"
            and not (name == "mul" and _is_scalar(other) and a.tensors[0].dtype in _HALF)
        ):
            getattr(torch, f"_foreach_{name}_")(a.tensors, other)
            return _written(a)
        if b_temporary and isinstance(b, TensorList) and b.owned and b.layout is layout:
            if name in ("add", "mul"):  # commutes bit for bit
                getattr(torch, f"_foreach_{name}_")(b.tensors, a.tensors)
                return b
            if name == "sub":  # a - b == (-b) + a exactly
                torch._foreach_neg_(b.tensors)
                torch._foreach_add_(b.tensors, a.tensors)
                return b
    if name == "mul" and _scalable(a, b, layout):
        return _Scaled(a, b, cast(Layout, layout))
    return TensorList(getattr(torch, f"_foreach_{name}")(a.tensors, other), layout, owned=True)


def _fused(
    name: str, a: TensorList, operands: tuple[Any, ...], kwargs: dict[str, Any], temporary: bool
) -> Any:
    """``a.<name>(*operands, **kwargs)`` (``lerp``, ``addcmul``, ``addcdiv``, ``add``
    with ``alpha``) as one foreach call: in place in ``a`` where ``a`` is a temporary
    of the result's layout, else into new tensors. Operands are TensorLists of ``a``'s
    length, 0-d tensors (broadcast, as a list) or, for ``lerp``'s weight, a number;
    anything else, or a tensor ``value``, runs leaf by leaf as ``Tensor.<name>``."""
    if not all(_is_scalar(v) for v in kwargs.values()):
        return _map(getattr(Tensor, name), (a, *operands), kwargs)
    lists: list[Any] = []
    layout = a.layout
    for operand in operands:
        if isinstance(operand, TensorList):
            lists.append(_operand(a, operand))
        elif isinstance(operand, Tensor) and operand.dim() == 0 and name != "lerp":
            lists.append([operand] * len(a.tensors))
        elif _is_scalar(operand) and name == "lerp":
            lists.append(operand)
        else:
            return _map(getattr(Tensor, name), (a, *operands), kwargs)
        layout = _result_layout(_token(layout), operand)
    if isinstance(layout, Layout) and temporary and (a.owned or a.donated) and a.layout is layout:
        getattr(torch, f"_foreach_{name}_")(a.tensors, *lists, **kwargs)
        return _written(a)
    result = getattr(torch, f"_foreach_{name}")(a.tensors, *lists, **kwargs)
    return TensorList(result, layout, owned=True)


def _written(a: TensorList) -> TensorList:
    """``a`` after an op wrote its result into it: a donated list's storage now holds
    the result, as a new temporary (the donation is used up)."""
    if not a.donated:
        return a
    a.donated = False
    return TensorList(a.tensors, a.layout, owned=True)


def _token(layout: Layout | str | None) -> TensorList:
    """An empty TensorList carrying ``layout``, to fold :func:`_result_layout`."""
    return TensorList((), layout)


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
        layout = _result_layout(a, b)
        return TensorList(torch._foreach_maximum(a.tensors, _check_length(a, b)), layout, True)
    return NotImplemented


def _sqrt(a: Any) -> Any:
    return _unary("sqrt", a, False) if isinstance(a, TensorList) else NotImplemented


def _reflected(name: str) -> Callable[[Any, Any], Any]:
    """``t <op> x`` for a 0-d tensor ``t`` and a TensorList ``x`` (``Tensor.__mul__``
    runs first, and hands ``Tensor.mul`` to the list): ``x <op> t``, the same bits for
    an op that commutes, as one foreach call that keeps the list's layout. Not for half
    precision leaves: there a 0-d operand on the left is rounded to the leaves' dtype
    first and one on the right is not (torch 2.13, CPU), so ``t * x`` runs leaf by leaf."""

    def reflected(a: Any, b: Any = None, *rest: Any) -> Any:
        if (
            not rest
            and isinstance(a, Tensor)
            and a.dim() == 0
            and isinstance(b, TensorList)
            and not (b.tensors and b.tensors[0].dtype in _HALF)
        ):
            return _binary(name, b, a, False, False)
        return NotImplemented

    return reflected


_TORCH_FAST: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.maximum: _maximum,
    torch.sqrt: _sqrt,
    Tensor.mul: _reflected("mul"),  # what Tensor.__mul__ hands over
    Tensor.add: _reflected("add"),
}
