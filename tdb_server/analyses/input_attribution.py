"""Input attribution per token: gradient x input and integrated gradients of a target.

The input is the `embed` site (token + position embedding, [T, D]); attributions are summed over
d_model. Integrated gradients integrate along baseline + alpha (input - baseline) with the midpoint
rule (`steps` points, batched); completeness: sum over tokens ~= value - baseline_value. Baseline:
zero at `embed`, or `embed` of one token id at every position (position embeddings kept). Norms are
scale-invariant (norm(a x) ~= norm(x) unless a ~ sqrt(eps)), so the model jumps right next to a zero
baseline and the integral misses the jump: the completeness gap shows it; a token baseline avoids it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdb_server.errors import InvalidArgument

from .inputs import Target
from .registry import register

MAX_STEPS = 1024
BATCH = 16


@dataclass
class InputAttributionResult:
    value: float
    grad_x_input: torch.Tensor | None           # [T]
    integrated_gradients: torch.Tensor | None   # [T]
    baseline_value: float
    steps: int


class _Embed:
    """Replaces `embed` by alpha * clean (a leaf that requires grad), one alpha per batch element;
    records the final residual for direction targets."""

    def __init__(self, last: str, alphas: torch.Tensor | None, clean: torch.Tensor | None,
                 base: torch.Tensor | None = None):
        self.sites = frozenset({"embed", last})
        self.last, self.alphas, self.clean = last, alphas, clean
        self.base = torch.zeros_like(clean) if base is None and clean is not None else base
        self.embed: torch.Tensor | None = None
        self.resid: torch.Tensor | None = None

    def on_site(self, site, value):
        if site != "embed":
            self.resid = value
            return None
        if self.alphas is None:
            x = value.detach()
        else:  # [B, T, D]: base + alpha (clean - base)
            x = self.base[None] + self.alphas[:, None, None].to(value) * (self.clean - self.base)[None]
        self.embed = x.clone().requires_grad_(True)
        return self.embed


def _run(adapter, ids: list[int], target: Target, alphas=None, clean=None, base=None) -> tuple[torch.Tensor, _Embed]:
    last = f"blocks.{adapter.info.n_layers - 1}.resid_post"
    handler = _Embed(last, alphas, clean, base)
    batch = 1 if alphas is None else len(alphas)
    logits = adapter.forward(torch.tensor([ids] * batch), handler, grad=True)
    values = target.read(logits, handler.resid)                            # [B]
    values.sum().backward()
    return values.detach(), handler


@register("input_attribution", "per-token gradient x input and integrated gradients (steps configurable) of a target")
def input_attribution(adapter, token_ids: list[int], target: Target, *, grad_x_input: bool = True,
                      integrated_gradients: bool = True, steps: int = 32,
                      baseline_token_id: int | None = None) -> InputAttributionResult:
    if integrated_gradients and not 1 <= steps <= MAX_STEPS:
        raise InvalidArgument(f"steps must be in 1..{MAX_STEPS}", reason="OUT_OF_RANGE")
    if baseline_token_id is not None and not 0 <= baseline_token_id < adapter.info.vocab_size:
        raise InvalidArgument(f"baseline token id {baseline_token_id} is outside the vocabulary "
                              f"[0, {adapter.info.vocab_size})", reason="BAD_TOKEN_ID")
    values, h = _run(adapter, token_ids, target)
    clean = h.embed.detach()[0]                                              # [T, D]
    gxi = (clean.float() * h.embed.grad[0].float()).sum(-1).cpu() if grad_x_input else None
    ig, baseline = None, float("nan")
    if integrated_gradients:
        base = torch.zeros_like(clean)
        if baseline_token_id is not None:
            with torch.no_grad():
                _, hbase = _run_no_grad(adapter, [baseline_token_id] * len(token_ids), target, None)
            base = hbase.embed.detach()[0]
        alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
        total = torch.zeros_like(clean, dtype=torch.float32)
        for start in range(0, steps, BATCH):
            _, hb = _run(adapter, token_ids, target, alphas[start:start + BATCH], clean, base)
            total += hb.embed.grad.float().sum(0)
        ig = ((clean - base).float() * total / steps).sum(-1).cpu()
        with torch.no_grad():
            at_base, _ = _run_no_grad(adapter, token_ids, target, clean, base)
        baseline = float(at_base)
    return InputAttributionResult(float(values[0]), gxi, ig, baseline, steps if integrated_gradients else 0)


def _run_no_grad(adapter, ids, target, clean, base=None):
    """alpha = 0: the target at the baseline (clean None: an unpatched forward)."""
    last = f"blocks.{adapter.info.n_layers - 1}.resid_post"
    handler = _Embed(last, None if clean is None else torch.zeros(1), clean, base)
    logits = adapter.forward(torch.tensor([ids]), handler)
    return target.read(logits, handler.resid)[0], handler
