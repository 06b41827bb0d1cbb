"""functorch_reg: regularized training in the ``torch.func`` style.

Penalties and proximal operators are pure functions of a parameter pytree; the
update rules are pure ``init``/``step`` functions that compile, vmap over
hyperparameters and match ``torch.optim`` step for step::

    import functorch_reg as fr

    params = {k: v.detach() for k, v in model.named_parameters()}
    opt = fr.adamw(lr=1e-3, weight_decay=1e-2, mask=fr.select.weights())
    state = opt.init(params)
    grads = torch.func.grad(objective)(params, x, y)
    params, state = opt.step(params, grads, state)
"""

from . import distributed, function_space, hypergrad, penalties, prox, select
from .adapter import TorchOptimizer
from .ensemble import (
    LinearPath,
    SweepResult,
    ensemble_step,
    init_ensemble,
    lambda_grid,
    linear_path,
    sweep,
)
from .optim import (
    AdamState,
    Optimizer,
    SGDState,
    adam,
    adamw,
    load_state_dict,
    schedules,
    sgd,
    state_dict,
)
from .tree import leaf_names, stack, unstack

__version__ = "0.1.0"

__all__ = [
    "AdamState",
    "LinearPath",
    "Optimizer",
    "SGDState",
    "SweepResult",
    "TorchOptimizer",
    "adam",
    "adamw",
    "distributed",
    "ensemble_step",
    "function_space",
    "hypergrad",
    "init_ensemble",
    "lambda_grid",
    "leaf_names",
    "linear_path",
    "load_state_dict",
    "penalties",
    "prox",
    "schedules",
    "select",
    "sgd",
    "stack",
    "state_dict",
    "sweep",
    "unstack",
]
