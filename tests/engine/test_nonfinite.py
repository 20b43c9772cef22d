"""The per-site NaN/Inf test every hooked site runs (engine/run.py `nonfinite`): one float32 sum first,
the exact test only when the sum is not finite. It must never miss a NaN or an Inf, and never report
finite values whose sum overflows."""

from __future__ import annotations

import pytest
import torch

from tdb_server.engine.run import nonfinite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finds_every_nan_and_inf(dtype):
    x = torch.randn(2, 5, 7).to(dtype)
    assert not nonfinite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 3, 2] = bad
        assert nonfinite(y)
    y = x.clone()
    y[0, 0, 0], y[1, 1, 1] = float("inf"), float("-inf")      # they cancel to NaN in a sum: still found
    assert nonfinite(y)


def test_finite_values_whose_sum_overflows_are_finite():
    x = torch.full((4, 8), 3e38, dtype=torch.float32)           # the float32 sum is inf
    assert not nonfinite(x)
    x[2, 3] = float("nan")
    assert nonfinite(x)
