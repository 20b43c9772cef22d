"""SAEs, activation records and explanations from the client (mixed into TdbClient via AnalysisMixin).

    with TdbClient("127.0.0.1:50051") as tdb:
        tdb.list_saes()                                   # the bundled model ships one at blocks.1.resid_post
        info = tdb.attach_sae("/path/on/server/to/sae")   # SAELens folder; info.quality.explained_variance, .l0
        rec = tdb.activation_records("blocks.1.mlp.neuron.7", on_progress=print)
        rec.to_pandas()                                   # one row per (record, token)
        tdb.explain("blocks.1.attn.head.2").text          # e.g. "attends to the token after an earlier copy ..."
        s = tdb.session(); s.set_breakpoints(["blocks.1.resid_post.sae.latent.42"])   # stops where it fires
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import grpc
import numpy as np

from tdb.v1 import analysis_pb2 as apb

from . import _wire
from .errors import TdbError


@dataclass(frozen=True)
class SaeQuality:
    explained_variance: float
    l0: float
    dead_latents: int
    dead_fraction: float
    tokens: int
    loss_clean: float
    loss_spliced: float
    loss_zero: float
    loss_recovered: float
    corpus: str


@dataclass(frozen=True)
class SaeInfo:
    site: str
    name: str
    path: str
    architecture: str
    d_in: int
    d_sae: int
    unit_prefix: str                    # append a latent index: "blocks.1.resid_post.sae.latent." + "42"
    quality: SaeQuality | None

    def latent(self, k: int) -> str:
        return f"{self.unit_prefix}{int(k)}"

    @classmethod
    def from_proto(cls, m: apb.SaeInfo) -> "SaeInfo":
        q = m.quality
        quality = SaeQuality(q.explained_variance, q.l0, q.dead_latents, q.dead_fraction, q.tokens, q.loss_clean,
                             q.loss_spliced, q.loss_zero, q.loss_recovered, q.corpus) if m.HasField("quality") else None
        return cls(m.site, m.name, m.path, m.architecture, m.d_in, m.d_sae, m.unit_prefix, quality)


@dataclass(frozen=True)
class ActivationWindow:
    window: int                 # index in the corpus
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    acts: np.ndarray            # [window] float32
    max_act: float
    max_pos: int

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(frozen=True)
class ActivationRecords:
    unit: str
    kind: str
    site: str
    corpus: str
    corpus_sha256: str
    window: int
    n_windows: int
    top: tuple[ActivationWindow, ...]
    random: tuple[ActivationWindow, ...]
    max_act: float
    mean_max: float
    frac_windows_active: float
    cached: bool

    def to_pandas(self) -> Any:
        """One row per (record, token): which ("top" / "random"), rank, window, position, token, activation."""
        import pandas as pd

        rows = []
        for which, recs in (("top", self.top), ("random", self.random)):
            for rank, w in enumerate(recs):
                for pos, (tok, act) in enumerate(zip(w.tokens, w.acts.tolist())):
                    rows.append({"which": which, "rank": rank, "window": w.window, "position": pos, "token": tok,
                                 "activation": act, "is_max": pos == w.max_pos})
        return pd.DataFrame(rows, columns=["which", "rank", "window", "position", "token", "activation", "is_max"])

    @classmethod
    def from_proto(cls, m: apb.ActivationRecordsResult) -> "ActivationRecords":
        def win(w: apb.ActivationWindow) -> ActivationWindow:
            return ActivationWindow(w.window, tuple(w.token_ids), tuple(w.tokens), _wire.from_wire(w.acts), w.max_act,
                                    w.max_pos)
        return cls(m.unit, m.kind, m.site, m.corpus, m.corpus_sha256, m.window, m.n_windows,
                   tuple(win(w) for w in m.top), tuple(win(w) for w in m.random), m.max_act, m.mean_max,
                   m.frac_windows_active, m.cached)


@dataclass(frozen=True)
class TokenShare:
    text: str
    share: float
    lift: float
    count: int
    token_id: int


@dataclass(frozen=True)
class Explanation:
    unit: str
    text: str
    method: str                          # "local" or "llm"
    label: str                           # heads: induction | previous_token | ...; else "tokens"
    top_tokens: tuple[TokenShare, ...]
    top_ngrams: tuple[TokenShare, ...]
    promoted: tuple[tuple[str, float], ...]
    suppressed: tuple[tuple[str, float], ...]
    attention: dict[str, float]          # heads: pattern scores on repeated random tokens
    corpus_attention: dict[str, float]   # heads: on corpus windows
    score: float | None
    notes: tuple[str, ...]
    records: ActivationRecords | None
    llm_configured: bool

    @classmethod
    def from_proto(cls, m: apb.ExplainResponse) -> "Explanation":
        share = lambda xs: tuple(TokenShare(t.text, t.share, t.lift, t.count, t.token_id) for t in xs)  # noqa: E731
        return cls(m.unit, m.text, m.method, m.label, share(m.top_tokens), share(m.top_ngrams),
                   tuple((t.text, t.logit) for t in m.promoted), tuple((t.text, t.logit) for t in m.suppressed),
                   dict(m.attention), dict(m.corpus_attention), m.score if m.HasField("score") else None,
                   tuple(m.notes), ActivationRecords.from_proto(m.records) if m.HasField("records") else None,
                   m.llm_configured)


class SaeMixin:
    """SAE / records / explanation calls (uses AnalysisMixin's `_analysis` stub)."""

    def attach_sae(self, path: str, *, name: str = "", quality: bool = True) -> SaeInfo:
        """Attach the SAE in a folder on the server (SAELens layout); replaces one at the same site."""
        return SaeInfo.from_proto(self._analysis("AttachSae", apb.AttachSaeRequest(
            path=path, name=name, skip_quality=not quality)))

    def list_saes(self) -> list[SaeInfo]:
        return [SaeInfo.from_proto(m) for m in self._analysis("ListSaes", apb.ListSaesRequest()).saes]

    def detach_sae(self, site: str) -> None:
        self._analysis("DetachSae", apb.DetachSaeRequest(site=site))

    def activation_records(self, unit: str, *, corpus_path: str = "", n_top: int = 20, n_random: int = 20,
                           window: int = 64, batch: int = 32, timeout: float | None = None,
                           on_progress: Callable[[int, int], Any] | None = None) -> ActivationRecords:
        """Top-activating and random windows of the corpus (default: the server's held-out slice)
        for a neuron, head or SAE latent; `on_progress(done, total)` while the server reads the corpus."""
        req = apb.ActivationRecordsRequest(unit=unit, corpus_path=corpus_path, n_top=n_top, n_random=n_random,
                                           window=window, batch=batch)
        stream = self._analysis.stream("ActivationRecords", req, timeout=timeout)
        try:
            for chunk in stream:
                if chunk.HasField("progress") and on_progress is not None:
                    on_progress(chunk.progress.done, chunk.progress.total)
                if chunk.HasField("records"):
                    return ActivationRecords.from_proto(chunk.records)
        except grpc.RpcError as e:
            raise TdbError.from_rpc(e) from None
        raise TdbError(grpc.StatusCode.UNKNOWN, "NO_RECORDS", "the server ended the stream without records")

    def explain(self, unit: str, *, corpus_path: str = "", use_llm: bool = False, n_top: int = 20, window: int = 64,
                include_records: bool = False) -> Explanation:
        """What a neuron, head or SAE latent responds to (local explainer; use_llm asks the endpoint the
        server's operator configured, falling back politely to the local explanation)."""
        return Explanation.from_proto(self._analysis("Explain", apb.ExplainRequest(
            unit=unit, corpus_path=corpus_path, use_llm=use_llm, n_top=n_top, window=window,
            include_records=include_records)))
