"""Activation records: the corpus windows where a neuron, head or SAE latent is most active, and a
random sample of windows, each with the unit's activation at every token.

| unit                               | activation at token t                                  |
|------------------------------------|--------------------------------------------------------|
| `blocks.L.mlp.neuron.N`            | mlp.post[t, N]                                         |
| `blocks.L.attn.head.H`             | |z[t, H] @ W_O[H]| (the norm of the head's write at t) |
| `blocks.L.<site>.sae.latent.K`     | a[t, K] of the SAE attached at blocks.L.<site>         |

One pass over the corpus (batched, with progress) computes the maximum of every unit of a site in
every window; it is cached on disk (`$TDB_CACHE` or `~/.cache/tdb`, under `records/`) keyed by the
model's fingerprint, the site (and the SAE's weights for latents), the corpus hash and the window
length. The cache holds at most `cache_bytes` (tdb serve --records-cache-mib): after each write, the least
recently used files (by modification time; a hit touches its file) go first. A unit's records are then
its top windows by maximum (ties: earlier window first) and a
seeded random sample of windows (seed from the unit's name), recomputed per token in one batch.
Everything is deterministic, so two calls (or two servers with the same model) give the same records.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tdb_server.errors import Cancelled, InvalidArgument
from tdb_server.model.fingerprint import fingerprint
from tdb_server.model.sites import SiteError, parse_unit
from tdb_server.sae.attach import sae_at
from tdb_server.sae.units import check_latent

from tdb_server.model.corpus import Corpus, cache_dir, load_corpus, windows

DEFAULT_WINDOW = 64
DEFAULT_BATCH = 32
MAX_RECORDS = 200
MAX_WINDOW = 4096          # tokens per window, for a model that states no context length
MAX_BATCH = 256            # windows per forward
FORWARD_BYTES = 1 << 30    # what one batched forward's logits may take (batch x window x vocab floats)
Progress = Callable[[int, int, str], None]   # (done, total, stage)


@dataclass(frozen=True)
class UnitRef:
    name: str
    kind: str        # "neuron" | "head" | "latent"
    layer: int
    index: int
    site: str        # where its activation is read


def unit_ref(adapter: Any, name: str) -> UnitRef:
    info = adapter.info
    try:
        u = parse_unit(name.strip(), info.n_layers, info.n_heads, info.d_mlp)
    except SiteError as e:
        raise InvalidArgument(f"activation records: {e.message}", reason="BAD_NODE", suggestions=e.suggestions) from None
    if u.kind == "latent":
        try:
            check_latent(adapter, u.site, u.index)
        except SiteError as e:
            raise InvalidArgument(f"activation records: {e.message}", reason="BAD_NODE") from None
    return UnitRef(u.name, u.kind, u.layer, u.index, u.site)


@dataclass
class Window:
    window: int                  # index of the window in the corpus
    token_ids: list[int]
    tokens: list[str]
    acts: list[float]            # the unit's activation at each token
    max_act: float
    max_pos: int


@dataclass
class Records:
    unit: str
    kind: str
    site: str
    corpus: str                  # corpus file name
    corpus_sha256: str
    window: int                  # tokens per window
    n_windows: int
    top: list[Window]
    random: list[Window]
    max_act: float               # over the whole corpus
    mean_max: float              # mean over windows of the window's maximum
    frac_windows_active: float   # windows whose maximum is > 0
    cached: bool = False         # the site pass came from the disk cache
    corpus_path: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Records":
        d = dict(d)
        d["top"] = [Window(**w) for w in d["top"]]
        d["random"] = [Window(**w) for w in d["random"]]
        return cls(**d)


# --- per-site activations -------------------------------------------------------------------------

def _site_acts(adapter: Any, kind: str, layer: int, site: str, ids: torch.Tensor) -> torch.Tensor:
    """Activations of every unit of the site's kind for ids [B, T] -> [B, T, units] float32 (CPU)."""
    cache = adapter.run_with_cache(ids, [site])[1]   # logits dropped at once
    v = cache[site]
    with torch.no_grad():
        if kind == "neuron":
            out = v.float()                                                           # [B, T, N]
        elif kind == "head":
            W_O = adapter.W_O(layer).float().to(v.device)                             # [H, Dh, D]
            out = torch.einsum("bthd,hdm->bthm", v.float(), W_O).norm(dim=-1)          # [B, T, H]
        else:
            out = sae_at(adapter, site).encode(v)                                    # [B, T, K]
    return out.cpu()


def _activation_site(ref: UnitRef) -> str:
    return f"blocks.{ref.layer}.attn.z" if ref.kind == "head" else ref.site


def _cache_key(adapter: Any, ref: UnitRef, corpus: Corpus, window: int) -> Path:
    fp = fingerprint(adapter)
    model = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    what = f"{ref.site}.{ref.kind}"
    if ref.kind == "latent":
        sae = sae_at(adapter, ref.site)
        h = hashlib.sha256()
        for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str).encode())
        what += "-" + h.hexdigest()[:12]
    return cache_dir() / "records" / model / f"{corpus.sha256[:16]}-w{window}" / f"{what}.npz"


DEFAULT_CACHE_BYTES = 1 << 30


def evict(root: Path, cap: int) -> int:
    """Remove the least recently used cache files under `root` until they hold at most `cap` bytes; returns
    the bytes left."""
    files = []
    for p in root.rglob("*.npz"):
        try:
            st = p.stat()
        except OSError:
            continue          # removed meanwhile (another server on the same cache)
        files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    for _, size, p in sorted(files):
        if total <= cap:
            break
        try:
            p.unlink()
            total -= size
        except OSError:
            pass
    return total


def site_maxima(adapter: Any, ref: UnitRef, corpus: Corpus, window: int = DEFAULT_WINDOW,
                batch: int = DEFAULT_BATCH, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None,
                cache_bytes: int = DEFAULT_CACHE_BYTES) -> tuple[np.ndarray, np.ndarray, bool]:
    """(maxima [n_windows, units], argmax positions [n_windows, units], from_cache) for the site of `ref`."""
    path = _cache_key(adapter, ref, corpus, window)
    if path.is_file():
        try:
            with np.load(path) as f:
                mx, am = f["max"], f["argmax"]
            os.utime(path)     # recently used: the last to be evicted
            return mx, am, True
        except (OSError, ValueError, KeyError):
            pass   # a damaged cache file is recomputed
    ids = windows(adapter, corpus, window)
    n = ids.shape[0]
    maxes, args = [], []
    site = _activation_site(ref)
    for start in range(0, n, batch):
        if should_stop is not None and should_stop():
            raise Cancelled("the client cancelled the request")
        acts = _site_acts(adapter, ref.kind, ref.layer, site if ref.kind != "latent" else ref.site,
                          ids[start:start + batch])                                     # [b, T, U]
        m, a = acts.max(dim=1)                                                         # [b, U]
        maxes.append(m.numpy())
        args.append(a.numpy().astype(np.int32))
        if progress is not None:
            progress(min(start + batch, n), n, "corpus")
    mx, am = np.concatenate(maxes), np.concatenate(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, max=mx, argmax=am)
    tmp.replace(path)
    evict(cache_dir() / "records", cache_bytes)
    return mx, am, False


# --- a unit's records -----------------------------------------------------------------------------

def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _check_sizes(adapter: Any, window: int, batch: int) -> None:
    """OUT_OF_RANGE for a window or batch that no forward should be asked to take."""
    limit = adapter.max_positions or MAX_WINDOW
    if not 1 <= window <= limit:
        raise InvalidArgument(f"window {window} must be in 1..{limit} (the model's positions)", reason="OUT_OF_RANGE")
    if not 1 <= batch <= MAX_BATCH:
        raise InvalidArgument(f"batch {batch} must be in 1..{MAX_BATCH}", reason="OUT_OF_RANGE")
    per_window = window * adapter.info.vocab_size * 4
    if batch * per_window > FORWARD_BYTES:
        raise InvalidArgument(f"batch {batch} x window {window} would make {batch * per_window / 2**20:.0f} MiB of "
                              f"logits per forward; use batch <= {max(1, FORWARD_BYTES // per_window)}",
                              reason="OUT_OF_RANGE")


def activation_records(adapter: Any, unit: str, corpus: Corpus | str | None = None, *, n_top: int = 20,
                       n_random: int = 20, window: int = DEFAULT_WINDOW, batch: int = DEFAULT_BATCH,
                       progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                       cache_bytes: int = DEFAULT_CACHE_BYTES) -> Records:
    """Top-activating and random windows of `corpus` (default: the bundled held-out slice) for a unit."""
    if not 0 <= n_top <= MAX_RECORDS or not 0 <= n_random <= MAX_RECORDS:
        raise InvalidArgument(f"n_top and n_random must be in 0..{MAX_RECORDS}", reason="OUT_OF_RANGE")
    _check_sizes(adapter, window, batch)
    ref = unit_ref(adapter, unit)
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    mx, am, cached = site_maxima(adapter, ref, corpus, window, batch, progress, should_stop, cache_bytes)
    col = mx[:, ref.index]                                                            # [n_windows]
    n = len(col)
    order = np.lexsort((np.arange(n), -col))                                          # max desc, then index
    top = [int(i) for i in order[:n_top]]
    rng = np.random.default_rng(_seed(ref.name))
    rand = sorted(int(i) for i in rng.choice(n, size=min(n_random, n), replace=False)) if n_random else []
    chosen = sorted(set(top) | set(rand))
    ids = windows(adapter, corpus, window)
    per_token: dict[int, torch.Tensor] = {}
    site = ref.site if ref.kind == "latent" else _activation_site(ref)
    for start in range(0, len(chosen), batch):
        part = chosen[start:start + batch]
        acts = _site_acts(adapter, ref.kind, ref.layer, site, ids[part])[..., ref.index]     # [b, T]
        per_token.update({w: acts[i] for i, w in enumerate(part)})
    def record(w: int) -> Window:
        a = per_token[w]
        t_ids = ids[w].tolist()
        return Window(w, t_ids, adapter.token_texts(t_ids), [round(float(x), 6) for x in a],
                      float(a.max()), int(a.argmax()))

    return Records(ref.name, ref.kind, ref.site if ref.kind != "head" else f"blocks.{ref.layer}.attn.z",
                   corpus.name, corpus.sha256, window, n, [record(w) for w in top], [record(w) for w in rand],
                   float(col.max()), float(col.mean()), float((col > 0).mean()), cached, corpus.path)
