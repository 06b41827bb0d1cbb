"""The one registry of update rules under test, in the manner of torch's ``optim_db``
(``torch/testing/_internal/common_optimizers.py``) and optax's ``_OPTIMIZERS_UNDER_TEST``.

Each :class:`OptimizerInfo` names a rule and an option set, builds our optimizer
(``make(**options)``, options added to the registered ones) and the implementation users
know (``reference(params)``: ``torch.optim``'s for-loop implementation, ``torch.optim.Muon``,
``lion_pytorch.Lion``, ``schedulefree``), and says what the shared properties need: the
param shapes the rule takes, its tolerance against the reference and the hyperparameter
that vmaps. ``tests/test_registry.py`` runs the properties over every entry; a new rule
is added here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import functorch_reg as fr

# A small MLP's params, as dict(model.named_parameters()) gives them.
MIXED = {"0.weight": (6, 4), "0.bias": (6,), "2.weight": (3, 6), "2.bias": (3,)}
# Muon orthogonalizes matrices only.
MATRICES = {"0.weight": (6, 4), "1.weight": (3, 6), "2.weight": (5, 5)}


@dataclass(frozen=True)
class OptimizerInfo:
    """One rule with one option set.

    Attributes:
        name: the test id.
        make: ``make(**extra) -> fr.Optimizer`` with the registered options (``extra``
            adds or overrides some).
        reference: ``reference(params) -> torch.optim.Optimizer``, the implementation ours
            must follow step for step (its ``train()`` is called when it has one).
        tolerance: the largest relative error against the reference after ``steps`` fp32
            steps (relative to each leaf's largest entry).
        steps: steps of the reference comparison.
        shapes: the param shapes the rule takes.
        vmapped: the hyperparameter vmapped over, and its values (one per member).
        vmap_options: options added for the vmap property (Muon: Newton-Schulz in fp32,
            since a batched bf16 matmul rounds otherwise than a loop of them).
    """

    name: str
    make: Callable[..., fr.Optimizer]
    reference: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    tolerance: float = 1e-6
    steps: int = 30
    shapes: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(MIXED))
    vmapped: tuple[str, tuple[float, ...]] = ("lr", (0.0, 1e-3, 1e-2, 5e-2))
    vmap_options: dict[str, Any] = field(default_factory=dict)

    def build_reference(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        reference = self.reference(params)
        if hasattr(reference, "train"):
            reference.train()  # schedulefree: the y point, where the gradient is taken
        return reference


def _lion(params: list[torch.Tensor], **kwargs: Any) -> torch.optim.Optimizer:
    lion_pytorch = pytest.importorskip("lion_pytorch")
    return lion_pytorch.Lion(params, **kwargs)


def _schedulefree(name: str, params: list[torch.Tensor], **kwargs: Any) -> torch.optim.Optimizer:
    schedulefree = pytest.importorskip("schedulefree")
    return getattr(schedulefree, name)(params, foreach=False, **kwargs)


SGD = torch.optim.SGD
ADAM = torch.optim.Adam
ADAMW = torch.optim.AdamW
_ADAMW_SF = {"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 0.05, "warmup_steps": 5}
_SGD_SF = {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.05, "warmup_steps": 5}

OPTIMIZERS: list[OptimizerInfo] = [
    OptimizerInfo(
        "sgd",
        lambda **kw: fr.sgd(**{"lr": 0.05, **kw}),
        lambda p: SGD(p, lr=0.05, foreach=False),
    ),
    OptimizerInfo(
        "sgd_momentum_dampening_decay",
        lambda **kw: fr.sgd(
            **{"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05, **kw}
        ),
        lambda p: SGD(p, lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.05, foreach=False),
    ),
    OptimizerInfo(
        "sgd_nesterov_maximize",
        lambda **kw: fr.sgd(
            **{"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True, **kw}
        ),
        lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, maximize=True, foreach=False),
    ),
    OptimizerInfo(
        "adam",
        lambda **kw: fr.adam(**{"lr": 1e-2, **kw}),
        lambda p: ADAM(p, lr=1e-2, foreach=False),
    ),
    OptimizerInfo(
        "adam_coupled_decay",
        lambda **kw: fr.adam(**{"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.05, **kw}),
        lambda p: ADAM(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05, foreach=False),
    ),
    OptimizerInfo(
        "amsgrad_maximize",
        lambda **kw: fr.adam(**{"lr": 1e-2, "amsgrad": True, "maximize": True, **kw}),
        lambda p: ADAM(p, lr=1e-2, amsgrad=True, maximize=True, foreach=False),
    ),
    OptimizerInfo(
        "adamw",
        lambda **kw: fr.adamw(**{"lr": 1e-2, "weight_decay": 0.1, **kw}),
        lambda p: ADAMW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    ),
    OptimizerInfo(
        "adamw_amsgrad",
        lambda **kw: fr.adamw(**{"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, **kw}),
        lambda p: ADAMW(p, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False),
    ),
    OptimizerInfo(
        "lion",
        lambda **kw: fr.lion(**{"lr": 3e-3, "betas": (0.9, 0.99), "weight_decay": 0.5, **kw}),
        lambda p: _lion(p, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.5),
        tolerance=1e-7,
        vmapped=("lr", (0.0, 1e-4, 1e-3, 3e-3)),
    ),
    OptimizerInfo(
        "lion_decoupled",
        lambda **kw: fr.lion(
            **{"lr": 3e-3, "weight_decay": 1.5e-3, "decoupled_weight_decay": True, **kw}
        ),
        lambda p: _lion(p, lr=3e-3, weight_decay=1.5e-3, decoupled_weight_decay=True),
        tolerance=1e-7,
        vmapped=("lr", (0.0, 1e-4, 1e-3, 3e-3)),
    ),
    OptimizerInfo(
        "muon",
        lambda **kw: fr.muon(**{"lr": 2e-2, "weight_decay": 0.1, **kw}),
        lambda p: torch.optim.Muon(p, lr=2e-2, weight_decay=0.1),
        shapes=dict(MATRICES),
        vmap_options={"ns_dtype": torch.float32},
    ),
    OptimizerInfo(
        "muon_match_rms_adamw",
        lambda **kw: fr.muon(
            **{"lr": 2e-2, "nesterov": False, "adjust_lr_fn": "match_rms_adamw", **kw}
        ),
        lambda p: torch.optim.Muon(p, lr=2e-2, nesterov=False, adjust_lr_fn="match_rms_adamw"),
        shapes=dict(MATRICES),
        vmap_options={"ns_dtype": torch.float32},
    ),
    OptimizerInfo(
        "schedule_free_sgd",
        lambda **kw: fr.schedule_free_sgd(**{**_SGD_SF, **kw}),
        lambda p: _schedulefree("SGDScheduleFree", p, **_SGD_SF),
    ),
    OptimizerInfo(
        "schedule_free_adamw",
        lambda **kw: fr.schedule_free_adamw(**{**_ADAMW_SF, **kw}),
        lambda p: _schedulefree("AdamWScheduleFree", p, **_ADAMW_SF),
    ),
]

BY_NAME = {info.name: info for info in OPTIMIZERS}


def params_for(info: OptimizerInfo, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random params of the shapes ``info`` takes."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator, dtype=dtype) for k, s in info.shapes.items()}


def grads_for(params: dict, step: int) -> dict:
    """A gradient that depends on the params, so trajectories that drift apart show it."""
    generator = torch.Generator().manual_seed(1000 + step)
    return {
        k: torch.randn(v.shape, generator=generator, dtype=v.dtype) + 0.3 * v
        for k, v in params.items()
    }
