"""Results of the SAE, activation-record and explanation calls (TdbClient's AnalysisMixin makes them;
`serde` converts the protocol's messages into these dataclasses).

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
from typing import Any

import numpy as np


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
