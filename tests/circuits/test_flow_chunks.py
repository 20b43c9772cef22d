"""Information flow's per-head proximities, computed a few query rows at a time against the keys a causal
head can attend: the same numbers as the whole [T, T, D] tensor at once, causal or not."""

from __future__ import annotations

import torch

from tdb_server.analyses.circuits import flow


def _whole(mid, A_h, vo_h):
    return flow._proximity(mid[:, None], A_h[..., None] * vo_h[None])        # [T, T]


def test_chunked_proximities_equal_the_whole_tensor_for_causal_and_full_attention(monkeypatch):
    g = torch.Generator().manual_seed(0)
    T, D = 37, 16
    mid, vo = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    scores = torch.randn(T, T, generator=g)
    causal = torch.softmax(scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1)
    full = torch.softmax(scores, -1)                                          # attends to later keys too
    for elements in (1, 5 * T * D, flow.CHUNK_ELEMENTS):                      # one row, five rows, 8 chunks
        monkeypatch.setattr(flow, "CHUNK_ELEMENTS", elements)
        for A in (causal, full):
            torch.testing.assert_close(flow._head_proximity(mid, A, vo), _whole(mid, A, vo), rtol=0, atol=0)
