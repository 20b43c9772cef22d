"""Input attribution per token: gradient x input and integrated gradients of a target.

The input is the `embed` site (token + position embedding, [T, D]); attributions are summed over
d_model. Integrated gradients integrate along baseline + alpha (input - baseline) with the midpoint
rule (`steps` points, batched); completeness: sum over tokens ~= value - baseline_value. The gap
between the two (Captum's convergence delta) is reported with every result, and the steps are tripled
(the midpoints of 3n points include those of n, so earlier gradients are reused) until the gap is within
`tolerance` of |value - baseline_value| or `max_steps` is reached (then `converged` is False). Baseline:
zero at `embed`, or `embed` of one token id at every position (position embeddings kept). Norms are
scale-invariant (norm(a x) ~= norm(x) unless a ~ sqrt(eps)), so the model jumps right next to a zero
baseline and the integral misses the jump: the completeness gap shows it; a token baseline avoids it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdb_server.errors import InvalidArgument
from tdb_server.model.capture import Capture, Edit

from .inputs import Target
from .registry import register

MAX_STEPS = 1024
BATCH = 16
TOLERANCE = 0.01          # default: the attributions add up to within 1% of value - baseline_value
REFINE = 3                # each refinement triples the steps (midpoints nest)


@dataclass
class InputAttributionResult:
    value: float
    grad_x_input: torch.Tensor | None           # [T]
    integrated_gradients: torch.Tensor | None   # [T]
    baseline_value: float
    steps: int                                  # the steps used, after refinement
    completeness_gap: float = float("nan")      # sum(ig) - (value - baseline_value)
    tolerance: float = TOLERANCE
    converged: bool = False                     # |gap| <= tolerance * |value - baseline_value|


def _interpolate(alphas: torch.Tensor, clean: torch.Tensor, base: torch.Tensor) -> Edit:
    """alphas [B], clean [T, D], base [T, D] -> an edit that sets `embed` to base + alpha (clean - base),
    one alpha per batch row ([B, T, D]), and leaves every other site alone."""
    def edit(site: str, value: torch.Tensor) -> torch.Tensor | None:
        if site != "embed":
            return None
        return base[None] + alphas[:, None, None].to(value) * (clean - base)[None]
    return edit


def _run(adapter, ids: list[int], target: Target, alphas: torch.Tensor | None = None,
         clean: torch.Tensor | None = None, base: torch.Tensor | None = None) -> tuple[torch.Tensor, Capture]:
    """The target and its gradient at `embed` (a leaf: the clean embedding, or the interpolation at
    `alphas` [B] between `base` and `clean` [T, D]) -> (values [B], the capture: `grad("embed")`)."""
    last = f"blocks.{adapter.info.n_layers - 1}.resid_post"
    batch = 1 if alphas is None else len(alphas)
    edit = None if alphas is None else _interpolate(alphas, clean, torch.zeros_like(clean) if base is None else base)
    logits, cache = adapter.run_with_cache(torch.tensor([ids] * batch), [last], edit=edit,
                                           edit_sites=("embed",), grad_sites=("embed",))
    values = target.read(logits, cache[last])                               # [B]
    values.sum().backward()
    return values.detach(), cache


def _value_at(adapter, ids: list[int], target: Target, edit: Edit) -> float:
    """The target of one forward (no gradients) with `embed` edited."""
    last = f"blocks.{adapter.info.n_layers - 1}.resid_post"
    logits, cache = adapter.run_with_cache(torch.tensor([ids]), [last], edit=edit, edit_sites=("embed",))
    with torch.no_grad():
        return float(target.read(logits, cache[last])[0])


def _grad_sum(adapter, ids: list[int], target: Target, alphas: torch.Tensor, clean: torch.Tensor,
              base: torch.Tensor) -> torch.Tensor:
    """The sum over `alphas` [n] of the target's gradient at `embed` along the path -> [T, D] (float32)."""
    total = torch.zeros_like(clean, dtype=torch.float32)
    for start in range(0, len(alphas), BATCH):
        _, hb = _run(adapter, ids, target, alphas[start:start + BATCH], clean, base)
        total += hb.grad("embed").float().sum(0)
    return total


def _new_midpoints(steps: int, previous: int) -> torch.Tensor:
    """The midpoints (j + 0.5) / steps not already among those of `previous` steps ([steps - previous])."""
    j = torch.arange(steps)
    if previous:
        j = j[(j % (steps // previous)) != (steps // previous) // 2]
    return (j.to(torch.float32) + 0.5) / steps


def _baseline(adapter, ids: list[int], clean: torch.Tensor, baseline_token_id: int | None) -> torch.Tensor:
    """Zero at `embed`, or `embed` of `baseline_token_id` at every position -> [T, D]."""
    if baseline_token_id is None:
        return torch.zeros_like(clean)
    base_ids = torch.tensor([[baseline_token_id] * len(ids)])
    return adapter.run_with_cache(base_ids, ["embed"])[1]["embed"][0]


def _check(adapter, steps: int, max_steps: int, tolerance: float, baseline_token_id: int | None) -> None:
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidArgument(f"steps must be in 1..{MAX_STEPS}", reason="OUT_OF_RANGE")
    if not steps <= max_steps <= MAX_STEPS:
        raise InvalidArgument(f"max_steps must be in steps..{MAX_STEPS} ({steps}..{MAX_STEPS})", reason="OUT_OF_RANGE")
    if not 0.0 < tolerance < 1.0:
        raise InvalidArgument("tolerance must be in (0, 1): a fraction of value - baseline_value", reason="OUT_OF_RANGE")
    if baseline_token_id is not None and not 0 <= baseline_token_id < adapter.info.vocab_size:
        raise InvalidArgument(f"baseline token id {baseline_token_id} is outside the vocabulary "
                              f"[0, {adapter.info.vocab_size})", reason="BAD_TOKEN_ID")


@register("input_attribution", "per-token gradient x input and integrated gradients (refined until complete "
                               "within a tolerance) of a target")
def input_attribution(adapter, token_ids: list[int], target: Target, *, grad_x_input: bool = True,
                      integrated_gradients: bool = True, steps: int = 32, baseline_token_id: int | None = None,
                      tolerance: float = TOLERANCE, max_steps: int = MAX_STEPS) -> InputAttributionResult:
    if integrated_gradients:
        _check(adapter, steps, max_steps, tolerance, baseline_token_id)
    values, h = _run(adapter, token_ids, target)
    value = float(values[0])
    clean = h["embed"].detach()[0]                                           # [T, D]
    gxi = (clean.float() * h.grad("embed")[0].float()).sum(-1).cpu() if grad_x_input else None
    if not integrated_gradients:
        return InputAttributionResult(value, gxi, None, float("nan"), 0)
    base = _baseline(adapter, token_ids, clean, baseline_token_id)
    baseline = _value_at(adapter, token_ids, target, _interpolate(torch.zeros(1), clean, base))
    change = value - baseline
    total, done, n = torch.zeros_like(clean, dtype=torch.float32), 0, steps
    while True:
        total += _grad_sum(adapter, token_ids, target, _new_midpoints(n, done), clean, base)
        done = n
        ig = ((clean - base).float() * total / n).sum(-1).cpu()              # [T]
        gap = float(ig.sum()) - change
        converged = abs(gap) <= tolerance * abs(change)
        if converged or n * REFINE > max_steps:
            return InputAttributionResult(value, gxi, ig, baseline, n, gap, tolerance, converged)
        n *= REFINE
