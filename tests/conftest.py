"""Shared fixtures: the devices to test on and small parameter pytrees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Every test that takes ``device`` runs on the CPU, and on CUDA when present."""
    return request.param


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    """Each test counts its own compiles."""
    torch._dynamo.reset()
    yield


def mlp_params(
    dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Parameters of a small MLP, as ``dict(model.named_parameters())`` would give."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (6, 4), "0.bias": (6,), "2.weight": (3, 6), "2.bias": (3,)}
    return {
        name: torch.randn(shape, generator=generator, dtype=dtype).to(device)
        for name, shape in shapes.items()
    }
