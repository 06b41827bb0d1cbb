"""The compiler internals of :func:`functorch_reg.train_step`: the Inductor options and
the graph pass it adds, a code object per compiled step, and the static-address marks of
the CUDA-graph modes.

A module of its own so that ``import functorch_reg`` does not load Dynamo or Inductor:
``train_step(compile=True)`` imports it.
"""

from __future__ import annotations

import operator
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.utils import is_pointwise_use, is_view

from .tree import flatten

__all__ = ["UnfuseGradientAddmm", "inductor_options", "mark_static", "own_code"]


class UnfuseGradientAddmm(CustomGraphPass):
    """Turn ``addmm(inp, a, b)`` back into ``mm(a, b) + inp`` where ``inp`` has the full
    output shape, is an element-wise function of the graph's inputs, and every use of
    the result is element-wise (or the ``cat`` that forms a flat gradient).

    A penalty's gradient reaches a weight as ``mm(...) + penalty_grad``. On CPU, Inductor
    folds that into ``addmm``, which writes the penalty's gradient to memory and reads it
    twice (copied into the output, then read by the GEMM). Left as an addition, it fuses
    into the optimizer's element-wise update, which reads the weight anyway, and the
    penalty costs little more than its forward reduction. Inductor already makes this
    choice on GPUs for element-wise uses (``should_prefer_unfused_addmm``), not for the
    flat layout's ``cat``; a 1-d bias (the forward of a ``Linear``) stays fused.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.addmm.default:
                continue
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            inp, mat1, mat2 = node.args[:3]
            out, bias = node.meta.get("val"), getattr(inp, "meta", {}).get("val")
            if not isinstance(out, Tensor) or not isinstance(bias, Tensor):
                continue
            if (
                bias.shape != out.shape
                or not all(is_pointwise_use(user, _is_cat) for user in node.users)
                or not _elementwise_of_inputs(inp, {})
            ):
                continue
            with graph.inserting_before(node):
                product = graph.call_function(aten.mm.default, (mat1, mat2))
                product.meta["val"] = out
                total = graph.call_function(aten.add.Tensor, (product, inp))
                total.meta["val"] = out
            node.replace_all_uses_with(total)
            graph.erase_node(node)

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


def _is_cat(op: torch._ops.OpOverload) -> bool:
    # With the flat layout, each weight's gradient is copied into its group's flat
    # gradient by a cat, whose copy loop the addition joins.
    return op is torch.ops.aten.cat.default


def _elementwise_of_inputs(node: Any, known: dict[torch.fx.Node, bool]) -> bool:
    """Whether ``node`` is computed from the graph's inputs by element-wise ops and views.

    Only such gradients (l1, l2, elastic net, l2_sp) are unfused: one that depends on a
    reduction of the weight, like group lasso's row norms, would make Inductor 2.13 fuse
    that reduction and the update into one outer loop, whose C++ codegen fails.
    """
    if not isinstance(node, torch.fx.Node) or node.op in ("placeholder", "get_attr"):
        return True
    if node not in known:
        target = node.target
        # getitem picks one output of a multi-output view op: the flat layout's split.
        elementwise = target is operator.getitem or (
            isinstance(target, torch._ops.OpOverload)
            and (torch.Tag.pointwise in target.tags or is_view(target))
        )
        known[node] = (
            node.op == "call_function"
            and elementwise
            and all(_elementwise_of_inputs(arg, known) for arg in node.all_input_nodes)
        )
    return known[node]


def inductor_options(mode: str | None) -> dict[str, Any]:
    """The options of ``torch.compile(mode=mode)`` plus :class:`UnfuseGradientAddmm`."""
    options = dict(torch._inductor.list_mode_options(mode or "default"))
    options["post_grad_custom_post_pass"] = UnfuseGradientAddmm()
    return options


def own_code(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` as a function with a code object of its own.

    Dynamo caches compiled graphs per code object and counts every new closure or
    bound ``self`` as a recompile of that code; with ``fullgraph=True`` the ninth
    ``train_step`` of a process would then fail at the recompile limit.
    """
    function = method.__func__  # type: ignore[attr-defined]
    fresh = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    return types.MethodType(fresh, method.__self__)  # type: ignore[attr-defined]


def mark_static(*trees: Any) -> None:
    """Mark every tensor of the trees as a static input (its address is fixed), so a
    CUDA-graph replay reads it in place instead of copying it in."""
    for tree in trees:
        for leaf in flatten(tree)[0]:
            if isinstance(leaf, Tensor) and not hasattr(leaf, "_dynamo_static_input_type"):
                torch._dynamo.mark_static_address(leaf)
