"""The local explainer: what a neuron, head or SAE latent responds to, from its activation records and
the weights, with no network.

* Tokens and n-grams most associated with high activation: over the top records, the tokens at
  positions where the unit is at least half its maximum ("top activations"); each token's share of
  them and its lift (share / the token's frequency in the corpus); bigrams likewise.
* Logit lens: the tokens the component's write promotes / suppresses through the final norm's
  weight (scale 1) and the unembedding: neuron W_out[n]; latent W_dec[k] mapped to the residual
  stream; head: its mean write at its top activations.
* Heads: attention-pattern scores (each the mean over query positions t where it applies):

| score          | attention of t to                                                            |
|----------------|------------------------------------------------------------------------------|
| previous_token | t - 1                                                                        |
| induction      | every s < t whose previous token equals token t (the token after an earlier copy of the current token) |
| duplicate      | every s < t with the same token as t                                         |
| first_token    | position 0                                                                   |
| self           | t itself                                                                     |

  measured on repeated random tokens (BOS-free r + r, r uniform over the vocabulary, fixed seed:
  the same probe the bundled model's ground truth uses) and on the corpus windows. The head's label
  is the largest probe score above `HEAD_THRESHOLD` among induction, previous_token, duplicate,
  self, first_token.

`score`: how well the explanation predicts activations — the Pearson correlation, over every token
of the top and random records, between "token is one of the explanation's tokens" and the activation.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from tdb_server.analyses.stats import pearson
from tdb_server.model.sites import parse_unit
from tdb_server.model.corpus import load_corpus, windows
from tdb_server.records.records import Records
from tdb_server.sae.attach import sae_at
from tdb_server.sae.attribution import to_residual

TOP_FRACTION = 0.5
HEAD_THRESHOLD = 0.3
PROBE_HALF = 30
PROBE_BATCH = 16
PROBE_SEED = 4321
HEAD_SCORES = ("induction", "previous_token", "duplicate", "self", "first_token")
HEAD_TEXT = {
    "induction": "attends to the token after an earlier copy of the current token (induction)",
    "previous_token": "attends to the previous token",
    "duplicate": "attends to earlier copies of the current token",
    "self": "attends to the current token itself",
    "first_token": "attends mostly to the first token (attention sink)",
}


@dataclass
class TokenStat:
    text: str
    share: float          # of the top activations
    lift: float           # share / corpus frequency
    count: int
    token_id: int = -1    # single tokens (n-grams: -1)


@dataclass
class Explanation:
    unit: str
    text: str
    method: str                                    # "local" or "llm"
    label: str = ""                                # heads: the pattern; neurons / latents: "tokens"
    top_tokens: list[TokenStat] = field(default_factory=list)
    top_ngrams: list[TokenStat] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    attention: dict[str, float] = field(default_factory=dict)          # probe scores (heads)
    corpus_attention: dict[str, float] = field(default_factory=dict)   # corpus scores (heads)
    score: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Explanation":
        d = dict(d)
        d["top_tokens"] = [TokenStat(**t) for t in d.get("top_tokens", [])]
        d["top_ngrams"] = [TokenStat(**t) for t in d.get("top_ngrams", [])]
        d["promoted"] = [tuple(x) for x in d.get("promoted", [])]
        d["suppressed"] = [tuple(x) for x in d.get("suppressed", [])]
        return cls(**d)


# --- tokens and n-grams ---------------------------------------------------------------------------

def _top_positions(records: Records) -> list[tuple[int, int]]:
    """(record index, position) of the top activations: >= TOP_FRACTION of the maximum, and > 0."""
    peak = max((w.max_act for w in records.top), default=0.0)
    if peak <= 0:
        return []
    return [(i, t) for i, w in enumerate(records.top) for t, a in enumerate(w.acts) if a >= TOP_FRACTION * peak]


def token_stats(adapter: Any, records: Records, k: int = 8) -> tuple[list[TokenStat], list[TokenStat]]:
    pos = _top_positions(records)
    if not pos:
        return [], []
    toks = Counter(records.top[i].token_ids[t] for i, t in pos)
    grams = Counter((records.top[i].token_ids[t - 1], records.top[i].token_ids[t]) for i, t in pos if t > 0)
    try:   # corpus frequencies for the lift
        ids = windows(adapter, load_corpus(records.corpus_path or None), records.window)
        freq = torch.bincount(ids.flatten(), minlength=adapter.info.vocab_size).float()
        freq = freq / freq.sum()
    except Exception:  # noqa: BLE001
        freq = None
    text = adapter.token_texts
    n = len(pos)
    out = []
    for t, c in toks.most_common(k):
        share = c / n
        lift = share / float(freq[t]) if freq is not None and freq[t] > 0 else float("nan")
        out.append(TokenStat(text([t])[0], round(share, 4), round(lift, 2), c, int(t)))
    ng = [TokenStat("".join(text([a, b])), round(c / n, 4), float("nan"), c) for (a, b), c in grams.most_common(k)]
    return out, ng


# --- logit lens -----------------------------------------------------------------------------------

def logit_lens_tokens(adapter: Any, direction: torch.Tensor, k: int = 8) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Tokens a residual-stream direction [D] promotes / suppresses (final norm weight, scale 1, then W_U)."""
    d = direction.float().to(adapter.W_U.device)
    x = adapter.final_norm_linear(d, torch.ones(1, device=d.device)).float()
    logits = x @ adapter.W_U.float()                                                  # [V]
    logits = logits - logits.mean()
    top, bottom = torch.topk(logits, k), torch.topk(-logits, k)
    up = zip(adapter.token_texts(top.indices.tolist()), top.values.tolist())
    down = zip(adapter.token_texts(bottom.indices.tolist()), (-bottom.values).tolist())
    return [(t, round(v, 4)) for t, v in up], [(t, round(v, 4)) for t, v in down]


def unit_direction(adapter: Any, records: Records) -> torch.Tensor | None:
    """The unit's write to the residual stream [D] (per unit of activation)."""
    u = parse_unit(records.unit)
    if u.kind == "neuron":
        return adapter.W_out(u.layer)[u.index]
    if u.kind == "latent":
        d = sae_at(adapter, u.site).write_direction(u.index)
        M = to_residual(adapter, u.site)
        return d if M is None else d @ M.to(d.device)
    # head: its mean write at its top activations
    pos = _top_positions(records)[:64]
    if not pos:
        return None
    ids = torch.tensor([records.top[i].token_ids for i in sorted({i for i, _ in pos})])
    keep = {i: j for j, i in enumerate(sorted({i for i, _ in pos}))}
    site = f"blocks.{u.layer}.attn.z"
    cache = adapter.run_with_cache(ids, [site])[1]   # logits dropped at once
    z = cache[site][:, :, u.index].float()                                              # [b, T, Dh]
    W = adapter.W_O(u.layer)[u.index].float().to(z.device)                            # [Dh, D]
    return torch.stack([z[keep[i], t] @ W for i, t in pos]).mean(0)


# --- heads: attention-pattern scores ---------------------------------------------------------------

def pattern_scores(pattern: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """pattern [B, T, T] of one head, ids [B, T] -> the HEAD_SCORES (mean over applicable queries)."""
    B, T, _ = pattern.shape
    p = pattern.float()
    q = torch.arange(T)
    earlier = q[None, :] < q[:, None]                                                  # [T, T] s < t
    same = ids[:, :, None] == ids[:, None, :]                                          # [B, T, T] tok t == tok s
    prev_same = torch.zeros_like(same)
    prev_same[:, :, 1:] = ids[:, :, None] == ids[:, None, :-1]                         # tok[s-1] == tok[t]
    out = {}

    def masked(mask: torch.Tensor) -> float:
        mass = (p * mask).sum(-1)                                                      # [B, T]
        applies = mask.any(-1)
        return float(mass[applies].mean()) if applies.any() else float("nan")

    out["induction"] = masked(prev_same & earlier[None])
    out["duplicate"] = masked(same & earlier[None])
    out["previous_token"] = float(p[:, q[1:], q[1:] - 1].mean()) if T > 1 else float("nan")
    out["self"] = float(p[:, q, q].mean())
    out["first_token"] = float(p[:, 1:, 0].mean()) if T > 1 else float("nan")
    return {k: round(v, 4) for k, v in out.items()}


def _head_pattern(adapter: Any, layer: int, head: int, ids: torch.Tensor) -> torch.Tensor:
    site = f"blocks.{layer}.attn.pattern"
    cache = adapter.run_with_cache(ids, [site])[1]   # logits dropped at once
    return cache[site][:, head].cpu()                                                    # [B, T, T]


def probe_ids(adapter: Any, half: int = PROBE_HALF, batch: int = PROBE_BATCH, seed: int = PROBE_SEED) -> torch.Tensor:
    """Repeated random tokens r + r -> [batch, 2 * half] (r uniform over the vocabulary, special tokens excluded)."""
    g = torch.Generator().manual_seed(seed)
    V = adapter.info.vocab_size
    special = set(getattr(adapter.tokenizer, "all_special_ids", []) or []) if adapter.tokenizer is not None else set()
    pool = torch.tensor([i for i in range(V) if i not in special])
    r = pool[torch.randint(len(pool), (batch, half), generator=g)]
    return torch.cat([r, r], dim=1)


def head_scores(adapter: Any, layer: int, head: int, corpus_ids: torch.Tensor | None) -> tuple[dict, dict]:
    probe = pattern_scores(_head_pattern(adapter, layer, head, probe_ids(adapter)), probe_ids(adapter))
    corpus = {}
    if corpus_ids is not None and len(corpus_ids):
        corpus = pattern_scores(_head_pattern(adapter, layer, head, corpus_ids), corpus_ids)
    return probe, corpus


# --- scoring and the explanation ---------------------------------------------------------------------

def score_tokens(records: Records, token_ids: set[int]) -> float | None:
    """Pearson correlation over all record tokens between [token in token_ids] and the activation."""
    pred, act = [], []
    for w in (*records.top, *records.random):
        pred += [float(t in token_ids) for t in w.token_ids]
        act += w.acts
    r = pearson(torch.tensor(pred, dtype=torch.float64), torch.tensor(act, dtype=torch.float64))
    return None if math.isnan(r) else round(r, 4)


def explain_local(adapter: Any, records: Records, corpus_windows: int = 32) -> Explanation:
    """The local explanation of the unit whose records these are."""
    u = parse_unit(records.unit)
    tokens, grams = token_stats(adapter, records)
    direction = unit_direction(adapter, records)
    promoted, suppressed = logit_lens_tokens(adapter, direction) if direction is not None else ([], [])
    exp = Explanation(records.unit, "", "local", top_tokens=tokens, top_ngrams=grams, promoted=promoted,
                      suppressed=suppressed)
    if u.kind == "head":
        try:
            cids = windows(adapter, load_corpus(records.corpus_path or None), records.window, corpus_windows)
        except Exception:  # noqa: BLE001 - a corpus-free probe is still informative
            cids = None
        exp.attention, exp.corpus_attention = head_scores(adapter, u.layer, u.index, cids)
        best = max(HEAD_SCORES, key=lambda k: -1 if np.isnan(exp.attention[k]) else exp.attention[k])
        if exp.attention[best] >= HEAD_THRESHOLD:
            exp.label = best
            exp.text = f"{HEAD_TEXT[best]}: {exp.attention[best]:.0%} of its attention on repeated random tokens"
            if exp.corpus_attention:
                exp.text += f", {exp.corpus_attention[best]:.0%} on the corpus"
            exp.score = exp.attention[best]
        else:
            exp.label = "diffuse"
            exp.text = "no clear attention pattern (" + ", ".join(f"{k} {v:.2f}" for k, v in exp.attention.items()) + ")"
    else:
        exp.label = "tokens"
        if tokens:
            lead = ", ".join(f"{t.text!r} ({t.share:.0%})" for t in tokens[:3])
            exp.text = f"fires on {lead} of its top activations"
            if grams and grams[0].share >= 0.2:
                exp.text += f"; often in {grams[0].text!r}"
            exp.score = score_tokens(records, {t.token_id for t in tokens[:3]})
        else:
            exp.text = "never active on this corpus"
    if promoted:
        exp.text += "; promotes " + ", ".join(repr(t) for t, _ in promoted[:3])
    return exp
