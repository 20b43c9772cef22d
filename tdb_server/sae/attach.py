"""Attaching SAEs to a loaded model, splicing them into a forward pass, and their quality report.

An attached SAE belongs to the model adapter (every session and analysis on that model sees it), at
most one per site. Its latents are units `blocks.{L}.{site}.sae.latent.{K}` of that site. It is
*spliced* with the reconstruction error kept:

    x' = decode(a') + (x - decode(a)),   a = encode(x),  a' = a with any latent edits

so with no edits x' == x (up to float rounding) and the model's outputs do not change; editing
latent k changes the site by exactly (a'_k - a_k) * W_dec[k] (times the SAE's per-position output
scale). The engine and the analyses use that closed form (`Sae.latent_delta`) instead of running
the whole decoder; `SaeSplice` runs the literal splice.

Quality (on the held-out corpus, or seeded random tokens for a model without a tokenizer):
explained variance of the site's value, mean L0 (latents active per token), dead latents (never
active on the evaluation tokens), and the next-token loss clean / with the reconstruction in place
of the site (no error term) / with the site zeroed, whence the fraction of loss recovered.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tdb_server.errors import InvalidArgument, NotFound
from tdb_server.model.corpus import load_corpus, windows
from tdb_server.model.sites import parse_site

from .sae import Sae, explained_variance, load_sae

EVAL_WINDOWS = 24
EVAL_WINDOW = 64


@dataclass
class Quality:
    explained_variance: float
    l0: float                       # mean active latents per token
    dead_latents: int               # never active on the evaluation tokens
    dead_fraction: float
    tokens: int                     # evaluation tokens
    loss_clean: float
    loss_spliced: float             # reconstruction in place of the site, no error term
    loss_zero: float                # the site zeroed
    loss_recovered: float           # (zero - spliced) / (zero - clean)
    corpus: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AttachedSae:
    sae: Sae
    name: str                       # the folder name, or what the caller named it
    quality: Quality | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def site(self) -> str:
        return self.sae.site


_ATTACHED: "weakref.WeakKeyDictionary[Any, dict[str, AttachedSae]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def attached(adapter: Any) -> dict[str, AttachedSae]:
    """Site -> attached SAE (a copy of the table)."""
    with _LOCK:
        return dict(_ATTACHED.get(adapter, {}))


def sae_at(adapter: Any, site: str) -> Sae | None:
    with _LOCK:
        a = _ATTACHED.get(adapter, {}).get(site)
    return a.sae if a is not None else None


def _check_site(adapter: Any, sae: Sae) -> None:
    info = adapter.info
    s = parse_site(sae.site, info.n_layers)
    if s.kind in ("attn.pattern", "attn.q", "attn.k", "attn.v", "logits"):
        raise InvalidArgument(f"an SAE on {s.name} is not supported (use a residual, attn.z, attn.out, mlp or "
                              "mlp.out site)", reason="BAD_SAE")
    width = {"attn.z": info.n_heads * info.d_head, "mlp.pre": info.d_mlp, "mlp.post": info.d_mlp}.get(
        s.kind, info.d_model)
    if sae.cfg.d_in != width:
        raise InvalidArgument(f"the SAE reads {sae.site} with d_in={sae.cfg.d_in}; that site of this model has width "
                              f"{width}", reason="SAE_SHAPE_MISMATCH")
    if sae.site not in adapter.verified_sites:
        raise InvalidArgument(f"{sae.site} is never reached by this model's forward pass", reason="UNVERIFIED_SITE")


def attach(adapter: Any, sae: Sae | str | Path, *, name: str = "", evaluate: bool = True) -> AttachedSae:
    """Attach an SAE (or the SAELens folder at a path) to the model; replaces one at the same site."""
    if not isinstance(sae, Sae):
        sae = load_sae(sae)
    _check_site(adapter, sae)
    device = adapter.model.get_input_embeddings().weight.device
    sae.to(device if device.type != "meta" else "cpu")
    entry = AttachedSae(sae, name or (Path(sae.path).name if sae.path else sae.site))
    if evaluate:
        entry.quality = quality(adapter, sae)
    with _LOCK:
        _ATTACHED.setdefault(adapter, {})[sae.site] = entry
    return entry


def detach(adapter: Any, site: str) -> None:
    with _LOCK:
        table = _ATTACHED.get(adapter, {})
        if site not in table:
            raise NotFound(f"no SAE is attached at {site!r}", reason="NO_SAE")
        del table[site]


def attach_bundled(adapter: Any, evaluate: bool = True) -> list[AttachedSae]:
    """Attach every SAE found under `<model folder>/saes/*/` (the bundled model ships one)."""
    folder = adapter.model_dir
    out = []
    if folder is None or not (folder / "saes").is_dir():
        return out
    have = {e.sae.path: e for e in attached(adapter).values()}
    for sub in sorted((folder / "saes").iterdir()):
        if str(sub) in have:            # already attached (another server over the same model)
            out.append(have[str(sub)])
        elif (sub / "cfg.json").is_file():
            out.append(attach(adapter, sub, evaluate=evaluate))
    return out


# --- the literal splice ---------------------------------------------------------------------------

class SaeSplice:
    """A SiteHandler that splices SAEs into a forward: x' = decode(edit(a)) + (x - decode(a)).

    `edit(site, a [B, T, d_sae]) -> a'` (optional) changes latents; `latents` keeps a per site."""

    def __init__(self, saes: dict[str, Sae], edit: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
        self.saes = saes
        self.edit = edit
        self.sites = frozenset(saes)
        self.latents: dict[str, torch.Tensor] = {}

    def on_site(self, site: str, value: torch.Tensor) -> torch.Tensor:
        sae = self.saes[site]
        x = sae.flat(value)
        a = sae.encode(value)
        error = x - sae.decode(a, x)
        a2 = self.edit(site, a) if self.edit is not None else a
        self.latents[site] = a2
        return (sae.decode(a2, x) + error).reshape(value.shape).to(value.dtype)


class _Replace:
    """Site handler for the quality report: capture (and optionally replace) one site."""

    def __init__(self, site: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.sites = frozenset({site})
        self.fn = fn
        self.value: torch.Tensor | None = None

    def on_site(self, site: str, value: torch.Tensor) -> torch.Tensor | None:
        self.value = value.detach()
        return None if self.fn is None else self.fn(value).to(value.dtype)


def _eval_tokens(adapter: Any) -> tuple[torch.Tensor, str]:
    """[n, T] evaluation token ids and their description."""
    if adapter.tokenizer is not None:
        try:
            c = load_corpus()
            return windows(adapter, c, EVAL_WINDOW, EVAL_WINDOWS), f"{c.name} ({c.sha256[:12]})"
        except Exception:  # noqa: BLE001 - no corpus / too short: fall back to random tokens
            pass
    g = torch.Generator().manual_seed(0)
    T = min(EVAL_WINDOW, adapter.max_positions or EVAL_WINDOW)
    return torch.randint(0, adapter.info.vocab_size, (8, T), generator=g), "random tokens (seed 0)"


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device)))


def quality(adapter: Any, sae: Sae, ids: torch.Tensor | None = None, corpus: str = "") -> Quality:
    """Reconstruction quality of `sae` at its site on [n, T] token ids (default: the held-out slice)."""
    if ids is None:
        ids, corpus = _eval_tokens(adapter)
    site = sae.site
    with torch.no_grad():
        cap = _Replace(site)
        clean = adapter.forward(ids, cap)
        x = sae.flat(cap.value)                                            # [n, T, d_in]
        a = sae.encode(cap.value)                                          # [n, T, d_sae]
        x_hat = sae.decode(a, x)
        spliced = adapter.forward(ids, _Replace(site, lambda v: sae.reconstruct(v)[1]))
        zeroed = adapter.forward(ids, _Replace(site, torch.zeros_like))
    active = a > 0
    dead = int((~active.flatten(0, -2).any(0)).sum())
    lc, ls, lz = _loss(clean, ids), _loss(spliced, ids), _loss(zeroed, ids)
    return Quality(explained_variance(x.flatten(0, -2), x_hat.flatten(0, -2)),
                   float(active.sum(-1).float().mean()), dead, dead / sae.d_sae, int(ids.numel()), lc, ls, lz,
                   float((lz - ls) / (lz - lc)) if lz != lc else float("nan"), corpus)
