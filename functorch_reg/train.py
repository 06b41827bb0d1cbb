"""One training step as one compiled graph: loss, gradient, penalty and update.

``fr.train_step(loss, optimizer)`` is the ``jax.jit(train_step)`` of optax users: a
callable that, per batch, takes the gradient of ``loss`` with
``torch.func.grad_and_value``, applies ``optimizer.step_`` in place and returns the
loss, all inside one ``torch.compile(fullgraph=True)`` graph. A penalty written in the
loss then lives in the same graph as the update, so Inductor can fuse the penalty's
gradient into the update's element-wise loop (both read the same weights).

Example:
    >>> import functorch_reg as fr
    >>> from torch.func import functional_call
    >>> model = torch.nn.Linear(3, 1)
    >>> params = {k: v.detach() for k, v in model.named_parameters()}
    >>> def loss(params, x, y, lam):
    ...     mse = torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)
    ...     return mse + lam * fr.penalties.l1(params, where="weight")
    >>> opt = fr.sgd(lr=0.1)
    >>> state = opt.init(params)
    >>> step = fr.train_step(loss, opt, compile=False)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> value = step(params, state, x, y, torch.tensor(1e-3), lr=torch.tensor(0.05))
    >>> value.shape
    torch.Size([])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol

import optree
import torch
from torch import Tensor
from torch.func import grad_and_value

from ._compile_log import Announced
from .modules import unwrap
from .optim.base import Optimizer, State
from .tree import Params, flatten

__all__ = ["Loss", "TrainStep", "train_step"]

Loss = Callable[..., Any]
"""``loss(params, *args) -> value`` (a 0-d tensor), or ``(value, aux)`` with ``has_aux``."""

# torch.compile modes that capture CUDA graphs, whose outputs the next replay overwrites.
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class FlatLayout(Protocol):
    """What :func:`train_step` needs of ``fr.flat.pack(...)``'s result."""

    def unpack(self, buffers: dict[str, Tensor]) -> dict[str, Tensor]: ...


class TrainStep:
    """The callable that :func:`train_step` returns; see there.

    Attributes:
        loss: the loss function.
        optimizer: the update rule.
        flat: the flat layout, or ``None`` for per-leaf params.
        has_aux: whether ``loss`` returns ``(value, aux)``.
        compiled: whether calls run the compiled graph.
        mode: the ``torch.compile`` mode.
        consts: whether the step passes the module's constants and buffers through.
        fullgraph: whether the compiled step must be one graph.

    Example:
        >>> import torch
        >>> import functorch_reg as fr
        >>> step = fr.train_step(lambda p, x: (p["w"] * x).sum(), fr.sgd(lr=0.1),
        ...                      compile=False)
        >>> step.compiled, step.has_aux, step.flat is None
        (False, False, True)
    """

    def __init__(
        self,
        loss: Loss,
        optimizer: Optimizer,
        *,
        flat: FlatLayout | None,
        has_aux: bool,
        compile: bool,
        mode: str | None,
        consts: bool = False,
        fullgraph: bool = True,
    ) -> None:
        if not callable(loss):
            raise TypeError(f"train_step: loss must be callable, got {type(loss).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "train_step: optimizer must be a functorch_reg Optimizer (fr.sgd, fr.adam, "
                f"fr.adamw), got {type(optimizer).__name__}"
            )
        if flat is not None and not callable(getattr(flat, "unpack", None)):
            raise TypeError(
                "train_step: flat must be the result of fr.flat.pack(params), "
                f"got {type(flat).__name__}"
            )
        if mode is not None and not compile:
            raise ValueError(f"train_step: mode={mode!r} needs compile=True")
        _refuse_compiled_modules(loss)
        from .flat import FlatParams

        if isinstance(flat, FlatParams) and optimizer.for_flat is not None:
            # A mask or prox written for leaves, translated to the buffers (or refused).
            optimizer = optimizer.for_flat(flat)
        self.loss = loss
        self.optimizer = optimizer
        self.flat = flat
        self.has_aux = has_aux
        self.compiled = compile
        self.mode = mode
        self.consts = consts
        self.fullgraph = fullgraph
        self._captures_cuda_graphs = mode in _CUDA_GRAPH_MODES
        self._floats = _FloatWatch()
        # Positions (in the flattened consts) of the tensors that a forward has updated,
        # which an eager step copies first; None until the first eager step.
        self._mutated: set[int] | None = None
        self._compiled_step = _compiled(self._step_in_place, fullgraph, mode) if compile else None

    def __call__(self, params: Params, state: State, *args: Any, **overrides: Any) -> Any:
        """One step in place: ``params`` and ``state`` are updated, the loss is returned.

        With ``consts=True`` the first of ``args`` is the module's constants (frozen
        params and buffers), whose buffers the forward updates in place too.

        Returns:
            The loss value, a 0-d tensor on the params' device (no host sync), or
            ``(value, aux)`` with ``has_aux``.
        """
        if self._compiled_step is None:
            return self._step_in_place(params, state, args, overrides)
        self._floats.watch(args, overrides)
        if self._captures_cuda_graphs:
            from ._graph_pass import mark_static  # loaded by the compile in __init__

            mark_static(params, state, args[0] if self.consts and args else None)
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]  # untyped in torch
        try:
            out = self._compiled_step(params, state, args, overrides)
        except torch._dynamo.exc.FailOnRecompileLimitHit as limit_error:
            changing = self._floats.advice()
            if changing:
                raise RuntimeError(
                    f"train_step: the compiled step hit torch's recompile limit; {changing}"
                ) from limit_error
            raise
        except torch._dynamo.exc.TorchDynamoException as compile_error:
            # Raised while tracing, before the graph ran: nothing has been written. The
            # same step in eager mode, pure, names the problem as eager code would.
            try:
                self.pure(params, state, *args, **overrides)
            except _CapturedBufferError as eager_error:
                raise eager_error from None  # the compile error says nothing more
            except Exception as eager_error:
                raise eager_error from compile_error
            add_note = getattr(compile_error, "add_note", None)  # Python 3.11+
            if isinstance(compile_error, torch._dynamo.exc.Unsupported) and add_note:
                add_note(
                    "train_step: the step does not compile as one graph; pass "
                    "fullgraph=False to let it break (the parts around a break run eagerly)"
                )
            raise
        if self._captures_cuda_graphs:
            # The next replay overwrites the graph's outputs; the caller may keep these.
            out = optree.tree_map(_clone, out, none_is_leaf=True)
        return out

    def pure(self, params: Params, state: State, *args: Any, **overrides: Any) -> tuple[Any, ...]:
        """The same step without side effects, for ``vmap``: ``(params, state, value)``.

        ``value`` is ``(value, aux)`` with ``has_aux``. With ``consts=True`` the first
        of ``args`` is the module's constants, which stay as they were: the step runs
        the forward on a copy and returns ``(params, state, consts, value)`` with the
        updated copy. Never compiled here: compile the vmapped function,
        ``torch.compile(vmap(step.pure), fullgraph=True)``.
        """
        if not self.consts:
            grads, value = self._grad_and_value(params, args)
            new_params, new_state = self.optimizer.step(params, grads, state, **overrides)
            return new_params, new_state, value
        consts, rest = self._split_consts(args)
        new_consts = optree.tree_map(_clone, consts, none_is_leaf=True)
        grads, value = self._grad_and_value(params, (new_consts, *rest))
        new_params, new_state = self.optimizer.step(params, grads, state, **overrides)
        return new_params, new_state, new_consts, value

    def _step_in_place(
        self, params: Params, state: State, args: tuple[Any, ...], overrides: dict[str, Any]
    ) -> Any:
        if not self.consts or torch.compiler.is_compiling():
            # Compiled, a graph writes its mutated inputs (consts) back at its end, after
            # the update went through (an error stops the trace before anything runs).
            grads, value = self._grad_and_value(params, args)
            value = _as_before_update(value, params)
            self.optimizer.step_(params, grads, state, **overrides)
            return value
        consts, rest = self._split_consts(args)
        # Eager: the forward updates copies of the tensors it updated before (all of
        # them the first time), written back once the update has gone through, so a
        # failing call leaves the module's buffers as they were. A big frozen backbone
        # in consts is copied on the first call only.
        leaves, treespec = optree.tree_flatten(consts, none_is_leaf=True)
        copied = {
            i: leaf.clone()
            for i, leaf in enumerate(leaves)
            if isinstance(leaf, Tensor) and (self._mutated is None or i in self._mutated)
        }
        versions = [leaf._version if isinstance(leaf, Tensor) else 0 for leaf in leaves]
        work = [copied.get(i, leaf) for i, leaf in enumerate(leaves)]
        grads, value = self._grad_and_value(params, (optree.tree_unflatten(treespec, work), *rest))
        value = _as_before_update(value, params)
        self.optimizer.step_(params, grads, state, **overrides)
        # A kernel that updates a tensor under torch.func (batch_norm's running
        # statistics) need not bump its version counter: compare values too.
        mutated = {i for i, copy in copied.items() if not torch.equal(copy, leaves[i])}
        mutated |= {
            i
            for i, leaf in enumerate(leaves)
            if isinstance(leaf, Tensor) and leaf._version != versions[i]
        }
        with torch.no_grad():
            for i in mutated & copied.keys():
                leaves[i].copy_(copied[i])
        self._mutated = mutated | (self._mutated or set())
        return value

    def _split_consts(self, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        if not args:
            raise TypeError(
                "train_step(consts=True): call step(params, state, consts, *args), with "
                "consts from fr.split_module(model)"
            )
        return args[0], args[1:]

    def _grad_and_value(self, params: Params, args: tuple[Any, ...]) -> tuple[Params, Any]:
        try:
            grads, (value, aux) = grad_and_value(self._objective, has_aux=True)(params, *args)
        except RuntimeError as error:
            if "would mutate a captured Tensor" not in str(error):
                raise
            raise _CapturedBufferError(_captured_buffer_message(self.loss)) from None
        return grads, ((value, aux) if self.has_aux else value)

    def _objective(self, params: Params, *args: Any) -> tuple[Tensor, Any]:
        leaves = params if self.flat is None else self.flat.unpack(params)
        out = self.loss(leaves, *args)
        if self.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    "train_step: with has_aux=True, loss must return a pair (value, aux), "
                    f"got {_describe(out)}"
                )
            value, aux = out
        else:
            if isinstance(out, tuple):
                raise TypeError(
                    f"train_step: loss returned a tuple of {len(out)}; pass has_aux=True "
                    "to return (value, aux)"
                )
            value, aux = out, ()
        if not isinstance(value, Tensor) or value.ndim != 0 or not value.is_floating_point():
            raise ValueError(
                f"train_step: loss must return a 0-d floating-point tensor, got {_describe(value)}"
            )
        return value, aux


def train_step(
    loss: Loss,
    optimizer: Optimizer,
    *,
    flat: FlatLayout | None = None,
    has_aux: bool = False,
    compile: bool = True,
    mode: str | None = None,
    consts: bool = False,
    fullgraph: bool = True,
) -> TrainStep:
    r"""Forward, gradient and update of ``loss`` as one call, compiled as one graph.

    ``step = train_step(loss, optimizer)``, then per batch
    ``value = step(params, state, *args, **overrides)`` computes

    .. math::
        v, g = \operatorname{value\_and\_grad}_\theta \; \mathrm{loss}(\theta, *args),
        \qquad (\theta, s) \leftarrow \mathrm{optimizer.step\_}(\theta, g, s, **overrides)

    in place and returns :math:`v` as a 0-d tensor, without a host sync. ``args`` are
    whatever changes per call (the batch, a 0-d ``lam`` tensor); ``overrides`` are the
    optimizer's per-call hyperparameters (``lr=``, ``weight_decay=``, ...).

    With ``compile=True`` the whole step is one ``torch.compile(fullgraph=True)`` graph,
    compiled on the first call. It does not recompile when the *values* of tensor
    arguments change (pass lr and lambda as 0-d float tensors on the params' device; a
    Python float that changes recompiles, and the second recompile it causes warns,
    naming the argument, as does torch's recompile-limit error). A new batch shape
    recompiles once, after which Dynamo marks the changed dims dynamic. Each
    ``train_step`` compiles its own code, so many of them in one process do not share
    Dynamo's recompile limit. The compile adds one Inductor graph pass, which keeps an
    element-wise penalty's gradient (l1, l2, elastic net, l2_sp) out of matmul biases on
    CPU and in the flat layout, so that it is added inside the update's loop rather than
    written out and read back.

    ``mode="reduce-overhead"`` captures CUDA graphs: the params and state tensors are
    marked as static inputs (``torch._dynamo.mark_static_address``), so the graph
    updates them in place rather than copying them in; the step calls
    ``torch.compiler.cudagraph_mark_step_begin()`` and returns a copy of the loss,
    which the next replay would overwrite. Pass the same params and state tensors
    every call: new addresses make CUDA graphs re-record. Large tensors that ``loss``
    captures (the reference of ``l2_sp``) are graph inputs too: mark them with
    ``torch._dynamo.mark_static_address`` or every replay copies them. On CPU the mode
    compiles as the default one.

    **Models with buffers and frozen params.** ``params, consts = fr.split_module(model)``
    splits a module into what trains and what does not (frozen params, and buffers such
    as BatchNorm's running statistics). With ``consts=True`` the step takes the consts
    after the optimizer state, ``step(params, state, consts, *args)``, and passes them
    to ``loss(params, consts, *args)``, which runs the model with
    ``functional_call(model, (params, consts), args)``. A forward in train mode then
    updates the buffers in place (the module's own, as ``split_module`` returns views),
    exactly as ``model(x)`` would: eager, compiled, and under ``"reduce-overhead"``
    (the consts are marked static like the params). An eager step runs the forward on
    copies of the tensors that forward updates, written back after the update went
    through; a compiled graph writes its inputs back at its end. So a call that raises
    leaves params, state and buffers bit-identical. A loss that runs
    ``functional_call(model, params, x)`` on a model whose forward updates its buffers
    raises an error that names the module and shows this pattern.

    ``fullgraph=False`` compiles the step without requiring one graph, for models whose
    forward breaks the graph (``transformers``' built-in loss with ``labels=`` logs a
    warning inside forward); the parts around a break run eagerly. A
    ``torch.compile``\ d module in ``loss`` is refused: give it the module itself,
    ``fr.unwrap(model)``, and let the step compile.

    Args:
        loss: ``loss(params, *args)`` returning a 0-d floating-point tensor, or
            ``(value, aux)`` with ``has_aux`` (``aux`` a pytree of tensors).
        optimizer: a functorch_reg update rule, e.g. ``fr.adamw(...)``.
        flat: a flat layout from ``fr.flat.pack``: the step then takes ``flat.buffers``
            as ``params`` (and the state of ``optimizer.init(flat.buffers)``), ``loss``
            receives the leaf views ``flat.unpack(buffers)``, and the gradient is taken
            with respect to the buffers.
        has_aux: ``loss`` returns ``(value, aux)``; the step returns them both, as
            they were before the update: an aux leaf that is a param (or a view of one)
            is copied (compiled, every aux leaf is), and both are detached, so that
            ``nn.Parameter`` params that require grad leave no autograd graph alive.
        compile: compile the step (``fullgraph=True``); ``False`` runs it eagerly.
        mode: the ``torch.compile`` mode, e.g. ``"reduce-overhead"``.
        consts: the step takes the module's constants (a pytree of tensors, e.g.
            ``fr.split_module(model)[1]``) after ``state`` and passes them to ``loss``
            after ``params``; buffers that the forward updates are updated in place.
        fullgraph: with ``compile=True``, require one graph (``torch.compile``'s
            ``fullgraph``); ``False`` lets the step's graph break.

    Returns:
        A :class:`TrainStep`: call it for the in-place step; ``step.pure(params, state,
        *args, **overrides) -> (params, state, value)`` is the side-effect-free step
        for ``vmap`` (compile the vmapped function, not the other way round).

    Raises:
        TypeError, ValueError: before anything is modified, when ``loss`` returns
            something other than a 0-d floating tensor (or a pair with ``has_aux``),
            when params, gradients and state do not match (naming the first differing
            leaf), or for a bad hyperparameter. In compiled mode such an error stops
            the trace; the step is then rerun eagerly and purely to raise the error
            eager code gives.
        RuntimeError: the loss's forward updates a buffer it does not receive as an
            argument (BatchNorm in train mode): the message names the module and shows
            ``consts=True``. Nothing has changed.
        TypeError: ``loss`` runs a ``torch.compile``\ d module (found by its global or
            closure name), at construction.

    Example:
        >>> import functorch_reg as fr
        >>> params = {"w": torch.ones(3)}
        >>> def loss(params, target):
        ...     return (params["w"] - target).square().sum()
        >>> opt = fr.sgd(lr=0.25)
        >>> state = opt.init(params)
        >>> step = fr.train_step(loss, opt, compile=False)
        >>> step(params, state, torch.zeros(3))
        tensor(3.)
        >>> params["w"]
        tensor([0.5000, 0.5000, 0.5000])

        A model with BatchNorm, its running statistics updated by each step:

        >>> from torch.func import functional_call
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> params, consts = fr.split_module(net)
        >>> def loss(params, consts, x):
        ...     return functional_call(net, (params, consts), (x,)).square().mean()
        >>> state = opt.init(params)
        >>> step = fr.train_step(loss, opt, consts=True, compile=False)
        >>> value = step(params, state, consts, torch.randn(8, 3))
        >>> int(net[1].num_batches_tracked)
        1
    """
    return TrainStep(
        loss,
        optimizer,
        flat=flat,
        has_aux=has_aux,
        compile=compile,
        mode=mode,
        consts=consts,
        fullgraph=fullgraph,
    )


class _FloatWatch:
    """Python floats among a compiled step's arguments whose value changes between calls.

    Dynamo specializes the graph on each float's value, so every new value recompiles
    (seconds each) and, past ``torch._dynamo.config.recompile_limit``, a
    ``fullgraph=True`` step fails. The second recompile caused by one argument warns,
    naming it; :meth:`advice` is what the recompile-limit error adds.
    """

    KEPT = 3  # distinct values remembered per argument: the third is the 2nd recompile

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}
        self.warned: set[str] = set()

    def watch(self, args: tuple[Any, ...], overrides: dict[str, Any]) -> None:
        """Record this call's floats; warn at an argument's second recompile."""
        for label, value in _float_arguments(args, overrides):
            values = self.seen.setdefault(label, [])
            if value not in values and len(values) < self.KEPT:
                values.append(value)
            if len(values) == self.KEPT and label not in self.warned:
                self.warned.add(label)
                warnings.warn(
                    f"train_step: {self._advice(label)}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def advice(self) -> str:
        """What to do about each float that has changed, or ``""``."""
        changed = [label for label, values in self.seen.items() if len(values) > 1]
        return "; ".join(self._advice(label) for label in changed)

    def _advice(self, label: str) -> str:
        values = ", ".join(repr(v) for v in self.seen[label])
        return (
            f"{label} of step(params, state, *args, **overrides) is a Python float that "
            f"changes between calls ({values}, ...), and "
            "every new value compiles the step again, until torch's recompile limit "
            f"({torch._dynamo.config.recompile_limit}) stops it; pass it as a 0-d tensor "
            f"on the params' device, e.g. torch.tensor({self.seen[label][-1]!r}, "
            "device=device), whose value changes without recompiling"
        )


def _float_arguments(args: tuple[Any, ...], overrides: dict[str, Any]) -> list[tuple[str, float]]:
    """``(label, value)`` of each Python float in ``args`` (at any depth) and ``overrides``."""
    found = []
    trees: tuple[tuple[str, Any], ...] = (("args", args), ("", overrides))
    for root, tree in trees:
        paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
        for path, leaf in zip(paths, leaves, strict=True):
            if isinstance(leaf, float):
                label = f"args[{path[0]}]" if root else f"override {path[0]}="
                label += "".join(f"[{key!r}]" for key in path[1:])
                found.append((label, float(leaf)))
    return found


def _compiled(method: Callable[..., Any], fullgraph: bool, mode: str | None) -> Any:
    """``torch.compile`` of ``method`` with train_step's Inductor options and a code
    object of its own, announced on its first call; the compiler internals load here."""
    from ._graph_pass import inductor_options, own_code

    return Announced(
        torch.compile(own_code(method), fullgraph=fullgraph, options=inductor_options(mode)),
        "train_step",
    )


def _as_before_update(value: Any, params: Params) -> Any:
    """The loss (and aux) as the in-place update will not change them: detached, so
    that a stored loss does not keep the step's autograd graph alive (``nn.Parameter``
    params that require grad), and an aux leaf that is a param, or a view (of one),
    copied, so that it reports the value that produced the loss. Under
    ``torch.compile`` views are not visible, so every aux leaf is copied (in-graph)."""
    compiling = torch.compiler.is_compiling()
    leaves, spec = optree.tree_flatten(value, none_is_leaf=True)
    targets = None
    kept = []
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            if compiling:
                leaf = leaf.detach().clone()
            else:
                if targets is None:
                    targets = _tensor_ids(params)
                copy = id(leaf) in targets or leaf._is_view()
                leaf = leaf.detach().clone() if copy else leaf.detach()
        kept.append(leaf)
    return optree.tree_unflatten(spec, kept)


def _tensor_ids(params: Params) -> set[int]:
    """The ids of the tensors in ``params`` (a flat dict without flattening: cheaper)."""
    leaves = params.values() if type(params) is dict else flatten(params)[0]
    return {id(leaf) for leaf in leaves if isinstance(leaf, Tensor)}


class _CapturedBufferError(RuntimeError):
    """The loss's forward updated a buffer that it did not receive as an argument."""


def _modules_of(loss: Loss) -> list[tuple[str, torch.nn.Module]]:
    """The modules that ``loss`` refers to by a global or closure name, with the name."""
    function = getattr(loss, "__func__", loss)
    code = getattr(function, "__code__", None)
    if code is None:
        return []
    found: dict[int, tuple[str, torch.nn.Module]] = {}
    cells = zip(code.co_freevars, getattr(function, "__closure__", None) or (), strict=False)
    named = [(name, cell.cell_contents) for name, cell in cells if _has_contents(cell)]
    module_globals = getattr(function, "__globals__", {})
    named += [(name, module_globals[name]) for name in code.co_names if name in module_globals]
    owner = getattr(loss, "__self__", None)  # a bound method of a module: self.loss
    if isinstance(owner, torch.nn.Module):
        named.insert(0, ("self", owner))
    for name, value in named:
        if isinstance(value, torch.nn.Module):
            found.setdefault(id(value), (name, value))
    return list(found.values())


def _has_contents(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018  # an empty cell raises
    except ValueError:
        return False
    return True


def _refuse_compiled_modules(loss: Loss) -> None:
    compiled = [
        f"{name}.{path}" if path else name
        for name, model in _modules_of(loss)
        for path, module in model.named_modules()
        if unwrap(module) is not module  # a torch.compile wrapper (OptimizedModule)
    ]
    if compiled:
        name = compiled[0]
        raise TypeError(
            f"train_step: loss runs {name!r}, a torch.compile'd module; train_step "
            "compiles the whole step (forward, gradient and update) itself: give the "
            f"loss the module inside ({name}._orig_mod, or fr.unwrap({name})) and "
            "keep train_step(compile=True)"
        )


def _captured_buffer_message(loss: Loss) -> str:
    what = "a module's forward updates a buffer (such as BatchNorm's running statistics)"
    for name, model in _modules_of(loss):
        found = [
            (f"{name}.{path}" if path else name, module)
            for path, module in model.named_modules()
            if module.training and any(True for _ in module.named_buffers(recurse=False))
        ]
        if found:
            path, module = found[0]
            buffers = ", ".join(k for k, _ in module.named_buffers(recurse=False))
            what = (
                f"the forward of {type(module).__name__} {path!r} (in train mode) "
                f"updates its buffers {buffers}"
            )
            break
    return (
        f"train_step: {what}, which the loss does not receive as arguments, and "
        "torch.func cannot differentiate through that. Pass the buffers through the step:\n"
        "    params, consts = fr.split_module(model)\n"
        "    def loss(params, consts, x, y):\n"
        "        out = functional_call(model, (params, consts), (x,))\n"
        "        ...\n"
        "    step = fr.train_step(loss, optimizer, consts=True)\n"
        "    step(params, state, consts, x, y)\n"
        "or call model.eval() if the buffers should not change."
    )


def _clone(leaf: Any) -> Any:
    return leaf.clone() if isinstance(leaf, Tensor) else leaf


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return type(value).__name__
