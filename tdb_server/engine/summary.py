"""Summaries of tensors: dtype, shape, min/max/mean/std/norm and NaN/Inf counts, computed on the
tensor's device with one host sync (dimension names of a site: model/sites.py site_dims)."""

from __future__ import annotations

import math

import torch

from .types import TensorSummary


def summarize(t: torch.Tensor, dims: list[str] | None = None) -> TensorSummary:
    """Statistics of a tensor computed on its device (one host sync for a handful of scalars; a
    second pass only when the tensor holds a NaN or an Inf). Every stop summarises its value, so the
    common all-finite case takes four reductions (min/max, var/mean, norm)."""
    head = {"dtype": t.dtype, "shape": tuple(t.shape), "numel": t.numel(), "dims": tuple(dims or ())}
    if t.numel() == 0:
        return TensorSummary(**head)
    x = t.detach()
    x = x.double() if x.dtype in (torch.float64,) else x.float()
    mn, mx = torch.aminmax(x)
    var, mean = torch.var_mean(x, correction=1) if x.numel() > 1 else (torch.zeros_like(mn), x.reshape(()))
    mn, mx, mean, norm, var = torch.stack([mn, mx, mean, x.norm(), var]).cpu().tolist()
    if math.isfinite(mn) and math.isfinite(mx):              # NaN or Inf anywhere would show in min or max
        return TensorSummary(**head, min=mn, max=mx, mean=mean, std=math.sqrt(var), norm=norm,
                             nan_count=0, inf_count=0)
    return _summarize_nonfinite(x, head)


def _summarize_nonfinite(x: torch.Tensor, head: dict) -> TensorSummary:
    """Statistics over the finite entries of a float tensor holding a NaN or an Inf, and their counts."""
    finite = torch.isfinite(x)
    nan = torch.isnan(x).sum()
    inf = torch.isinf(x).sum()
    xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    n_finite = finite.sum()
    stats = torch.stack([
        torch.where(finite, x, torch.full((), math.inf, dtype=x.dtype, device=x.device)).min(),
        torch.where(finite, x, torch.full((), -math.inf, dtype=x.dtype, device=x.device)).max(),
        xf.sum() / n_finite.clamp(min=1),
        xf.norm(),
        nan.to(x.dtype), inf.to(x.dtype), n_finite.to(x.dtype),
    ]).cpu().tolist()
    mn, mx, mean, norm, nans, infs, nf = stats
    var = ((xf - mean) * finite).pow(2).sum().item() / max(nf - 1, 1)
    mn, mx, mean, norm = (float(v) if nf else float("nan") for v in (mn, mx, mean, norm))
    return TensorSummary(**head, min=mn, max=mx, mean=mean, std=math.sqrt(var) if nf > 1 else 0.0, norm=norm,
                         nan_count=int(nans), inf_count=int(infs))
