"""Circuits: edge attribution (EAP), exact path patching of edges, circuit extraction, faithfulness,
and the information-flow graph.

| module           | what                                                                        |
|------------------|-----------------------------------------------------------------------------|
| topology.py      | senders, receivers, which can reach which, the residual stream each reads    |
| writes.py        | every sender's write from one forward (`run_with_cache`), bias terms         |
| split.py         | the split forward (`SplitRun`, below), chunking, cancellation                |
| scores.py        | `EdgeScores`, what the later steps read                                      |
| attribution.py   | `edge_attribution` (EAP), `path_patch`, `verify`                             |
| faithfulness.py  | `prune`, `faithfulness_values`, `extract_circuit`                            |
| graph.py         | `Graph` / `GraphNode` / `GraphEdge`, `circuit_graph`                         |
| flow.py          | `information_flow` (one forward, no corrupted prompt)                        |

The graph is the model's residual-stream graph. *Senders* write into the residual stream; *receivers*
read from it; an edge is one sender's write as seen by one receiver's input:

| sender                    | writes (per position)      | receiver                               | input                     |
|---------------------------|----------------------------|----------------------------------------|---------------------------|
| `embed`                   | the embed site             | `blocks.L.attn.head.H` via q           | resid_pre L -> q of H     |
| `blocks.L.attn.head.H`    | z[:, H] @ W_O[H]           | `blocks.L.attn.head.H` via k, v        | resid_pre L -> k / v of H |
| `blocks.L.mlp`            | blocks.L.mlp.out           | `blocks.L.mlp` via mlp                 | resid_mid L (parallel blocks: resid_pre L) |
|                           |                            | `logits` via logits                    | the final residual        |

Under GQA the k / v receivers are KV heads, `blocks.L.attn.kv_head.G` (a key is shared by its query
group, so it cannot be patched for one query head alone). Biases (b_O) are nobody's: they are the
same in every run. Sender s can reach receiver r when s is `embed`, or s's layer is below r's, or s
is a head and r the MLP of the same (sequential) block.

**Edge attribution (EAP)**: with Delta_s = write_s(corrupted) - write_s(clean) ([T, D]) and
G_r = d target / d input_r on the clean run ([T, D]), the edge score is
    eap(s -> r) = sum_t Delta_s[t] . G_r[t]   ~   target(edge s -> r corrupted) - target(clean).
G_r is the gradient through receiver r alone (its input is split from everybody else's), the
*total* derivative: everything downstream of r recomputes. All G_r come from one forward + one
backward (see the split forward below).

**Exact path patching** (what EAP approximates, and the definition tested): run the clean prompt;
receiver r alone reads input_r = clean input_r + Delta_s; every other receiver reads its own input as
computed in this run; everything downstream of r recomputes (other receivers see r's changed output).
    exact(s -> r) = target(that run) - target(clean).

**Circuit faithfulness** (edge ablation): every receiver r reads
    input_r = ablated_base_r + sum over circuit edges s -> r of (write_s(this run) - write_s(ablated))
where ablated_base_r is the residual stream that r reads in the ablated run (the corrupted prompt,
or every write replaced by its mean over positions on the clean prompt); so an edge outside the circuit carries the
ablated write and an edge inside it carries what the sender writes in this run. With every edge in,
this is the clean run; with none, the ablated one.
    faithfulness = (target(circuit) - target(ablated)) / (target(clean) - target(ablated)).

**The split forward** (`SplitRun`): one batched forward of the real HF model in which row `real`
is the run and each receiver r of it that needs its own input gets an *aux row*: at r's block the
aux row's stream is overwritten with input_r, and the real row takes r's value from the aux row at
r's own site (q / k / v of head H: `attn.q/k/v[:, :, H]`; the MLP: `mlp.out`; logits: the final
residual is set directly). Aux rows' other values are never read. The HF modules do the work (norms,
RoPE, GQA, gated MLPs), so nothing is re-implemented. With input_r = own input + eps_r (a zero leaf)
one backward gives every G_r; with input_r = own input + Delta_s it is exact path patching; with
the faithfulness inputs above it is a circuit run.
"""

from __future__ import annotations

from ..registry import register
from ..stats import pearson, spearman
from .attribution import DEFAULT_VERIFY, Verification, edge_attribution, path_patch, receiver_grads, verify
from .faithfulness import Circuit, CircuitResult, extract_circuit, faithfulness_values, prune
from .flow import FlowResult, information_flow
from .graph import Graph, GraphEdge, GraphNode, circuit_graph
from .scores import ABLATIONS, EdgeScores
from .split import MAX_ROWS, InputFn, RowPlan, SplitRun, split_forward
from .topology import INPUTS, Receiver, Sender, Topology, topology
from .writes import PromptRun, head_writes, mean_writes, run_prompt, sender_writes

__all__ = ["ABLATIONS", "Circuit", "CircuitResult", "DEFAULT_VERIFY", "EdgeScores", "FlowResult", "Graph",
           "GraphEdge", "GraphNode", "INPUTS", "InputFn", "MAX_ROWS", "PromptRun", "Receiver", "RowPlan", "Sender",
           "SplitRun", "Topology", "Verification", "circuit_graph", "edge_attribution", "extract_circuit",
           "faithfulness_values", "head_writes", "information_flow", "mean_writes", "path_patch", "pearson",
           "prune", "receiver_grads", "run_prompt", "sender_writes", "spearman", "split_forward", "topology",
           "verify"]


# --- registered analyses (in this order: it is the order Capabilities lists them) ---------------------

@register("edge_attribution", "EAP scores of every edge (upstream write -> head q/k/v, MLP, logits input)")
def _edge_attribution(adapter, ids, target, corrupted=None, ablation="corrupted"):
    return edge_attribution(adapter, ids, target, corrupted, ablation)


@register("path_patching", "exact path patching of edges, and rank correlation with EAP on the top edges")
def _verify(adapter, scores, top_k=DEFAULT_VERIFY):
    return verify(adapter, scores, top_k)


@register("circuit", "smallest top-EAP edge set reaching a faithfulness fraction (edge ablation, measured exactly)")
def _extract(adapter, scores, fraction=0.8, max_edges=0):
    return extract_circuit(adapter, scores, fraction, max_edges)


@register("information_flow", "information-flow routes from one forward (heads, MLPs, per position)")
def _information_flow(adapter, ids, position=-1, threshold=0.04):
    return information_flow(adapter, ids, position, threshold)
