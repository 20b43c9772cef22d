"""Graphs as the wire and the dashboard draw them (nodes, edges), and the circuit as one: its nodes are
the senders and receiver nodes its edges touch."""

from __future__ import annotations

from dataclasses import dataclass

from .scores import EdgeScores
from .topology import Receiver, Sender


@dataclass
class GraphNode:
    id: str
    kind: str          # circuit: "embed" | "head" | "kv_head" | "mlp" | "logits"; flow: "resid_pre" | "resid_mid" | "resid_post"
    layer: int         # embed -1, logits n_layers; flow: the block (resid_post: the last block)
    position: int = -1  # token position (flow graphs); -1 = all positions
    index: int = 0     # head / KV head
    label: str = ""


@dataclass
class GraphEdge:
    source: str
    target: str
    input: str         # circuit: "q" | "k" | "v" | "mlp" | "logits"; flow: "head" | "mlp" | "resid"
    effect: float      # circuit: EAP score; flow: importance (proximity share of the update, 0..1)
    exact: float | None = None   # circuit: exact path-patching effect, where verified
    component: str = ""          # flow: the head / MLP that carries the edge


@dataclass
class Graph:
    kind: str                     # "circuit" | "information_flow"
    nodes: list[GraphNode]
    edges: list[GraphEdge]


def _circuit_node(name: str, kind: str, layer: int, index: int) -> GraphNode:
    """A sender's or receiver's node: embed, logits, MLP{L}, L{L}H{h} or (GQA) KVL{L}H{g}."""
    if kind in ("embed", "logits"):
        return GraphNode(name, kind, layer, label=kind)
    if kind == "mlp":
        return GraphNode(name, "mlp", layer, label=f"MLP{layer}")
    return GraphNode(name, kind, layer, index=index, label=f"{'KV' if kind == 'kv_head' else ''}L{layer}H{index}")


def _sender_node(s: Sender) -> GraphNode:
    return _circuit_node(s.name, s.kind, s.layer, s.index)


def _receiver_node(r: Receiver) -> GraphNode:
    return _circuit_node(r.node, r.kind, r.layer, r.index)


def circuit_graph(scores: EdgeScores, edges: list[tuple[int, int]], exact: dict | None = None) -> Graph:
    """The circuit as a graph: nodes are the senders and receiver nodes the edges touch."""
    topo, exact = scores.topology, exact or {}
    nodes: dict[str, GraphNode] = {}
    out = []
    for s, r in edges:
        sender, receiver = topo.senders[s], topo.receivers[r]
        nodes.setdefault(sender.name, _sender_node(sender))
        nodes.setdefault(receiver.node, _receiver_node(receiver))
        out.append(GraphEdge(sender.name, receiver.node, receiver.input, float(scores.scores[s, r]), exact.get((s, r))))
    order = sorted(nodes.values(), key=lambda n: (n.layer, n.kind == "mlp", n.index))
    return Graph("circuit", order, out)
