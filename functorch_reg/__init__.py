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

from . import (
    diagnostics,
    distributed,
    flat,
    function_space,
    hypergrad,
    penalties,
    prox,
    select,
    sweep_data,
    sweep_step,  # noqa: F401  (fr.sweep_step: the member step's old home, kept)
)
from .adapter import TorchOptimizer
from .ensemble import SweepResult, ensemble_step, init_ensemble, sweep
from .modules import split_module, unwrap
from .optim import (
    AdamState,
    LionState,
    MuonState,
    Optimizer,
    ScheduleFreeState,
    SGDState,
    adam,
    adamw,
    convert_timescale,
    lion,
    load_state_dict,
    muon,
    schedule_free_adamw,
    schedule_free_eval,
    schedule_free_eval_,
    schedule_free_point,
    schedule_free_sgd,
    schedule_free_train,
    schedule_free_train_,
    schedules,
    sgd,
    state_dict,
)
from .paths import LinearPath, lambda_grid, linear_path
from .train import TrainStep, train_step
from .transforms import (
    EMA,
    EMAState,
    accumulate,
    accumulate_,
    clip_by_global_norm,
    ema,
    global_norm,
)
from .tree import leaf_names, stack, unstack

__version__ = "0.2.0"

__all__ = [
    "EMA",
    "AdamState",
    "EMAState",
    "LinearPath",
    "LionState",
    "MuonState",
    "Optimizer",
    "SGDState",
    "ScheduleFreeState",
    "SweepResult",
    "TorchOptimizer",
    "TrainStep",
    "accumulate",
    "accumulate_",
    "adam",
    "adamw",
    "clip_by_global_norm",
    "convert_timescale",
    "diagnostics",
    "distributed",
    "ema",
    "ensemble_step",
    "flat",
    "function_space",
    "global_norm",
    "hypergrad",
    "init_ensemble",
    "lambda_grid",
    "leaf_names",
    "linear_path",
    "lion",
    "load_state_dict",
    "muon",
    "penalties",
    "prox",
    "schedule_free_adamw",
    "schedule_free_eval",
    "schedule_free_eval_",
    "schedule_free_point",
    "schedule_free_sgd",
    "schedule_free_train",
    "schedule_free_train_",
    "schedules",
    "select",
    "sgd",
    "split_module",
    "stack",
    "state_dict",
    "sweep",
    "sweep_data",
    "train_step",
    "unstack",
    "unwrap",
]
