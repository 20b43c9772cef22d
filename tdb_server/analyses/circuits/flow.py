"""The information-flow graph (Ferrando & Voita's information-flow routes): from one forward, no
corrupted prompt, which heads, MLPs and residual connections carry what reaches one position."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tdb_server.errors import InvalidArgument
from tdb_server.model import ModelAdapter
from tdb_server.model.capture import Capture

from .graph import Graph, GraphEdge, GraphNode
from .writes import head_writes

FLOW_KINDS = ("resid_pre", "attn.v", "attn.pattern", "resid_mid", "mlp.out")
_DEPTH = {"resid_pre": 0.0, "resid_mid": 0.5, "resid_post": 1.0}   # within a block

FlowNode = tuple[str, int, int]                         # (resid_pre | resid_mid | resid_post, block, position)
Candidate = tuple[FlowNode, FlowNode, str, float, str]  # (source, target, input, importance, component)


def _proximity(y: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """y [..., D] (the sum), parts [K, ..., D] (its terms) -> max(|y|_1 - |y - part|_1, 0), [K, ...]."""
    return (y.abs().sum(-1) - (y - parts).abs().sum(-1)).clamp_min(0)


# a [rows, keys, D] chunk of one head's terms: 4 MiB of float32, which stays in cache (one head at 512 tokens of
# GPT-2-small, one CPU thread: 0.65 s in 64 MiB chunks, 0.09 s in 16 MiB, 0.047 s in 4 MiB, 0.052 s in 1 MiB)
CHUNK_ELEMENTS = 1 << 20


def _head_proximity(mid: torch.Tensor, A_h: torch.Tensor, vo_h: torch.Tensor) -> torch.Tensor:
    """mid [T, D], A_h [T(i), T(j)], vo_h [T(j), D] -> proximity of each term A_h[i, j] vo_h[j] to mid[i],
    [T(i), T(j)]: a few query rows at a time (a [T, T, D] tensor at once is 3 GiB per head at 1,024 tokens of
    GPT-2-small, and far slower out of cache), each against the keys up to its last row only where the later keys are not attended (a
    causal head: zero terms, whose proximity is zero)."""
    T, D = mid.shape
    out = mid.new_zeros(T, T)
    rows = max(1, min(CHUNK_ELEMENTS // max(1, T * D), -(-T // 8)))     # at least 8 chunks: ~44% of keys skipped
    for i0 in range(0, T, rows):
        i1 = min(T, i0 + rows)
        keys = i1 if not bool(A_h[i0:i1, i1:].any()) else T
        out[i0:i1, :keys] = _proximity(mid[i0:i1, None], A_h[i0:i1, :keys, None] * vo_h[None, :keys])
    return out


def _node(kind: str, L: int, p: int, n: int) -> FlowNode:
    """resid_pre of block n (past the last one) is the final resid_post."""
    return ("resid_post", n - 1, p) if kind == "resid_pre" and L == n else (kind, L, p)


def _node_id(node: FlowNode) -> str:
    kind, L, p = node
    return f"blocks.{L}.{kind}@{p}"


def _graph_node(node: FlowNode) -> GraphNode:
    kind, L, p = node
    return GraphNode(_node_id(node), kind, L, p, label=f"{kind} {L} @{p}")


def _depth(node: FlowNode) -> float:
    """resid_pre L -> L, resid_mid L -> L + 0.5, resid_post L -> L + 1."""
    return node[1] + _DEPTH[node[0]]


def _block_edges(adapter: ModelAdapter, cache: Capture, L: int, threshold: float) -> list[Candidate]:
    """Block L's edges with importance >= threshold: heads and the skip into resid_mid, the MLP and
    the skip into the next block's resid_pre."""
    info = adapter.info
    n, H, Hkv = info.n_layers, info.n_heads, info.n_kv_heads
    v = cache[f"blocks.{L}.attn.v"][0].float()                           # [T, Hkv, Dh]
    A = cache[f"blocks.{L}.attn.pattern"][0].float()                     # [H, T, T]
    pre, mid = cache[f"blocks.{L}.resid_pre"][0].float(), cache[f"blocks.{L}.resid_mid"][0].float()   # [T, D]
    mlp = cache[f"blocks.{L}.mlp.out"][0].float()                        # [T, D]
    T = pre.shape[0]
    vo = head_writes(adapter, L, v.repeat_interleave(H // Hkv, dim=1))  # [H, T, D]: v_h[j] W_O[h]
    b = adapter.b_O(L).float()
    prox_heads = torch.stack([_head_proximity(mid, A[h], vo[h]) for h in range(H)])   # [H, T(i), T(j)]
    prox_skip = _proximity(mid, pre[None])[0]                            # [T]
    prox_bias = _proximity(mid, b.expand_as(mid)[None])[0]
    total = prox_heads.sum((0, 2)) + prox_skip + prox_bias               # [T]
    imp_heads = prox_heads / total[None, :, None].clamp_min(1e-12)
    imp_skip = prox_skip / total.clamp_min(1e-12)
    post = mid + mlp
    p_mlp, p_res = _proximity(post, mlp[None])[0], _proximity(post, mid[None])[0]
    t2 = (p_mlp + p_res).clamp_min(1e-12)
    out: list[Candidate] = []
    for h, i, j in torch.nonzero(imp_heads >= threshold).tolist():    # (causal: j <= i)
        out.append((_node("resid_pre", L, j, n), _node("resid_mid", L, i, n), "head", float(imp_heads[h, i, j]),
                    f"blocks.{L}.attn.head.{h}"))
    for i in range(T):
        src, dst = _node("resid_mid", L, i, n), _node("resid_pre", L + 1, i, n)
        if imp_skip[i] >= threshold:
            out.append((_node("resid_pre", L, i, n), src, "resid", float(imp_skip[i]), ""))
        if p_mlp[i] / t2[i] >= threshold:
            out.append((src, dst, "mlp", float(p_mlp[i] / t2[i]), f"blocks.{L}.mlp"))
        if p_res[i] / t2[i] >= threshold:
            out.append((src, dst, "resid", float(p_res[i] / t2[i]), ""))
    return out


@dataclass
class FlowResult:
    graph: Graph
    position: int
    threshold: float
    elapsed_s: float
    n_edges_total: int   # edges above threshold anywhere (before keeping those that reach the position)


def information_flow(adapter: ModelAdapter, ids: list[int], position: int = -1, threshold: float = 0.04) -> FlowResult:
    """Information-flow routes (one forward, no corrupted prompt).

    At each block and position i the residual update is decomposed exactly into its terms:
    resid_mid[i] = resid_pre[i] + sum_{h, j <= i} A_h[i, j] v_h[j] W_O[h] + b_O, and
    resid_post[i] = resid_mid[i] + mlp.out[i]. A term c of a sum y gets the importance
    prox(c, y) / sum over the terms of prox, prox(c, y) = max(|y|_1 - |y - c|_1, 0) (the L1 proximity
    of Ferrando & Voita's information-flow routes). Edges with importance >= threshold are kept if they
    lie on a path to (final layer, position): head h moves resid_pre(L, j) -> resid_mid(L, i); the MLP
    and the residual connection move along a position. (Parallel blocks: resid_mid is resid_pre +
    attn.out as the sites define it; the MLP edge then leaves resid_mid as well — an approximation.)"""
    t0 = time.perf_counter()
    n, T = adapter.info.n_layers, len(ids)
    if not -T <= position < T:
        raise InvalidArgument(f"position {position} is out of range for {T} tokens", reason="OUT_OF_RANGE")
    if not 0.0 <= threshold < 1.0:
        raise InvalidArgument(f"threshold must be in [0, 1); got {threshold}", reason="OUT_OF_RANGE")
    position %= T
    sites = [f"blocks.{L}.{k}" for L in range(n) for k in FLOW_KINDS]
    cache = adapter.run_with_cache(torch.tensor([ids]), sites)[1]
    cand = [e for L in range(n) for e in _block_edges(adapter, cache, L, threshold)]
    # keep what reaches the final position, walking back from it
    reached = {_node("resid_pre", n, position, n)}
    kept: list[GraphEdge] = []
    for src, dst, inp, imp, comp in sorted(cand, key=lambda e: _depth(e[1]), reverse=True):
        if dst in reached:
            reached.add(src)
            kept.append(GraphEdge(_node_id(src), _node_id(dst), inp, imp, None, comp))
    nodes = [_graph_node(x) for x in sorted(reached, key=lambda x: (x[1], _depth(x), x[2]))]
    return FlowResult(Graph("information_flow", nodes, kept[::-1]), position, threshold,
                      time.perf_counter() - t0, len(cand))
