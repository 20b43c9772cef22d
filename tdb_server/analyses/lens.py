"""Logit lens (the final norm and unembedding applied to residual-stream sites) and attention patterns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdb_server.errors import InvalidArgument
from tdb_server.model.sites import expand_glob, parse_site

from .inputs import Target, position
from .registry import register

LENS_KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out", "final_norm")
MAX_TOP_K = 1000


@dataclass
class LensResult:
    sites: list[str]
    positions: list[int]
    top_ids: torch.Tensor        # [S, P, k] int64
    top_logits: torch.Tensor     # [S, P, k]
    top_probs: torch.Tensor      # [S, P, k]
    target_values: torch.Tensor | None  # [S, P]


def lens_sites(adapter, patterns: list[str]) -> list[str]:
    info = adapter.info
    if not patterns:
        return ["embed"] + [f"blocks.{layer}.resid_post" for layer in range(info.n_layers)]
    out: list[str] = []
    for pattern in patterns:
        for site in expand_glob(pattern, info.sites):
            kind = parse_site(site, info.n_layers).kind
            if kind not in LENS_KINDS:
                if any(c in pattern for c in "*?["):
                    continue
                raise InvalidArgument(f"logit lens of {site!r}: not a residual-stream site; use one of "
                                      f"{', '.join(LENS_KINDS)}", reason="BAD_SITE")
            if site not in out:
                out.append(site)
    if not out:
        raise InvalidArgument(f"no residual-stream site matches {patterns}", reason="BAD_SITE")
    return out


@register("logit_lens", "final norm + unembedding of any residual-stream site: top tokens per position, and the "
                        "target's value there")
def logit_lens(adapter, token_ids: list[int], sites: list[str], positions: list[int], top_k: int,
               target: Target | None = None) -> LensResult:
    T = len(token_ids)
    names = lens_sites(adapter, sites)
    pos = [position(p, T, "lens position") for p in positions] if positions else list(range(T))
    if not 0 < top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be in 1..{MAX_TOP_K}", reason="OUT_OF_RANGE")
    k = min(top_k, adapter.info.vocab_size)
    cache = adapter.run_with_cache(torch.tensor([token_ids]), names)[1]   # logits dropped at once
    with torch.no_grad():
        ids, lg, pr, tv = [], [], [], []
        W_U, b_U = adapter.W_U, adapter.b_U
        for site in names:
            x = cache[site][0, pos]                                      # [P, D]
            normed = x if site == "final_norm" else adapter.final_norm(x)
            logits = (normed.to(W_U.dtype) @ W_U + b_U).float()              # [P, V]
            probs = torch.softmax(logits, dim=-1)
            top = torch.topk(logits, k, dim=-1)
            ids.append(top.indices)
            lg.append(top.values)
            pr.append(probs.gather(-1, top.indices))
            if target is not None:
                tv.append(target.read_rows(logits, x))
    return LensResult(names, pos, torch.stack(ids).cpu(), torch.stack(lg).cpu(), torch.stack(pr).cpu(),
                      torch.stack(tv).cpu() if tv else None)


@register("attention_pattern", "attention probabilities of a layer's heads [head, query_pos, key_pos]")
def attention_pattern(adapter, token_ids: list[int], layer: int, heads: list[int]) -> torch.Tensor:
    info = adapter.info
    if not 0 <= layer < info.n_layers:
        raise InvalidArgument(f"layer {layer} out of range (0..{info.n_layers - 1})", reason="OUT_OF_RANGE")
    bad = [h for h in heads if not 0 <= h < info.n_heads]
    if bad:
        raise InvalidArgument(f"head {bad[0]} out of range (0..{info.n_heads - 1})", reason="OUT_OF_RANGE")
    site = f"blocks.{layer}.attn.pattern"
    cache = adapter.run_with_cache(torch.tensor([token_ids]), [site])[1]   # logits dropped at once
    pattern = cache[site][0].float().cpu()                               # [H, T, T]
    return pattern[heads] if heads else pattern
