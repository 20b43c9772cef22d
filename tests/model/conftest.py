"""Fixtures for the model layer (helpers live in model_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import FAMILIES, get_adapter


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def adapter(family):
    a = get_adapter(family)
    yield a
    assert a.installed_hook_count() == 0, "a test left tdb hooks on the model"


@pytest.fixture
def ids() -> torch.Tensor:
    """[2, 6] token ids."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (2, 6), generator=g)
