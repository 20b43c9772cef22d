"""Graphs a person can read: a circuit (edges between components, scored by EAP, some verified by
exact path patching) or an information-flow graph (routes between residual positions).

`Graph` holds nodes (id, kind, layer, position, index, label) and edges (source, target, input,
effect, exact, component); `to_json()`, `to_graphml()` (plain XML, readable by Gephi, yEd, networkx)
and `to_networkx()` (only if networkx is installed: it is not a dependency) export it.
`CircuitResult` is what `TdbClient.circuit` returns (`CircuitStream` while it runs); `FlowResult` what
`information_flow` returns. Plain dataclasses: `serde` converts the protocol's messages into them.

Node ids follow the site grammar: "embed", "blocks.L.attn.head.H", "blocks.L.attn.kv_head.G" (GQA:
key / value receivers), "blocks.L.mlp", "logits"; flow nodes "blocks.L.resid_pre@P" etc.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .results import ResolvedTarget


@dataclass(frozen=True)
class Node:
    id: str
    kind: str           # embed | head | kv_head | mlp | logits | resid_pre | resid_mid | resid_post
    layer: int          # embed -1, logits n_layers
    position: int = -1  # token position; -1 = every position
    index: int = 0      # head / KV head
    label: str = ""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    input: str                   # circuit: q | k | v | mlp | logits; flow: head | mlp | resid
    effect: float                # circuit: EAP score; flow: importance (0..1)
    exact: float | None = None   # circuit: exact path-patching effect where verified
    component: str = ""          # flow: the head / MLP that carries the edge


@dataclass
class Graph:
    kind: str                    # "circuit" | "information_flow"
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    def has_edge(self, source: str, target: str, input: str | None = None) -> bool:
        return any(e.source == source and e.target == target and (input is None or e.input == input)
                   for e in self.edges)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "nodes": [asdict(n) for n in self.nodes], "edges": [asdict(e) for e in self.edges]}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> "Graph":
        d = json.loads(text)
        return cls(d["kind"], [Node(**n) for n in d["nodes"]], [Edge(**e) for e in d["edges"]])

    def to_graphml(self) -> str:
        """GraphML (directed; multi-edges allowed: a head can feed another through q and k)."""
        keys = [("node", "kind", "string"), ("node", "layer", "int"), ("node", "position", "int"),
                ("node", "index", "int"), ("node", "label", "string"), ("edge", "input", "string"),
                ("edge", "effect", "double"), ("edge", "exact", "double"), ("edge", "component", "string")]
        out = ['<?xml version="1.0" encoding="UTF-8"?>',
               '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">']
        out += [f'  <key id="{n}" for="{f}" attr.name="{n}" attr.type="{t}"/>' for f, n, t in keys]
        out.append(f'  <graph id={quoteattr(self.kind)} edgedefault="directed">')
        for n in self.nodes:
            out.append(f"    <node id={quoteattr(n.id)}>" + "".join(
                f"<data key=\"{k}\">{_xml(getattr(n, k))}</data>" for k in ("kind", "layer", "position", "index", "label"))
                + "</node>")
        for i, e in enumerate(self.edges):
            data = [("input", e.input), ("effect", e.effect), ("component", e.component)]
            if e.exact is not None:
                data.append(("exact", e.exact))
            out.append(f'    <edge id="e{i}" source={quoteattr(e.source)} target={quoteattr(e.target)}>'
                       + "".join(f'<data key="{k}">{_xml(v)}</data>' for k, v in data) + "</edge>")
        out += ["  </graph>", "</graphml>"]
        return "\n".join(out) + "\n"

    def to_networkx(self) -> Any:
        """A networkx.MultiDiGraph (needs networkx, which tdb does not depend on)."""
        try:
            import networkx as nx
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("to_networkx needs networkx (pip install networkx); to_graphml works without it") from None
        g = nx.MultiDiGraph(kind=self.kind)
        for n in self.nodes:
            g.add_node(n.id, **{k: v for k, v in asdict(n).items() if k != "id"})
        for e in self.edges:
            g.add_edge(e.source, e.target, **{k: v for k, v in asdict(e).items() if k not in ("source", "target")})
        return g

    def to_pandas(self) -> Any:
        """The edges as a DataFrame (largest |effect| first)."""
        import pandas as pd

        df = pd.DataFrame([asdict(e) for e in self.edges], columns=list(Edge.__dataclass_fields__))
        return df.reindex(df["effect"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def _xml(v: Any) -> str:
    return str(v).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def quoteattr(v: str) -> str:
    """An XML attribute value in double quotes (as xml.sax.saxutils.quoteattr, whose import pulls in
    urllib and email: a tenth of the client's import time)."""
    return '"' + _xml(v).replace('"', "&quot;").replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;") + '"'


@dataclass(frozen=True)
class EdgeCheck:
    sender: str
    receiver: str
    input: str
    approx: float      # EAP score
    exact: float       # path patching


@dataclass
class CircuitResult:
    """Edge attribution over every edge, its exact check on the strongest edges, and the circuit."""

    tokens: list[str]
    corrupted_tokens: list[str]
    target: ResolvedTarget
    clean_value: float
    ablated_value: float            # every edge ablated
    ablation: str                   # "corrupted" | "mean"
    senders: list[str]
    receivers: list[str]
    scores: np.ndarray              # [senders, receivers] EAP scores
    verified: list[EdgeCheck]
    spearman: float                 # EAP vs exact on the verified edges
    pearson: float
    max_abs_error: float
    circuit: Graph
    faithfulness: float
    circuit_value: float
    fraction: float
    curve: list[tuple[int, int, float]]   # (top-k edges tried, kept after pruning, faithfulness)
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    def edges_frame(self) -> Any:
        """Every edge's EAP score as a DataFrame (sender, receiver, score), largest |score| first."""
        import pandas as pd

        s, r = np.nonzero(self.scores)
        df = pd.DataFrame({"sender": [self.senders[i] for i in s], "receiver": [self.receivers[j] for j in r],
                           "score": self.scores[s, r]})
        return df.reindex(df["score"].abs().sort_values(ascending=False).index).reset_index(drop=True)

    def to_pandas(self) -> Any:
        """The verified edges: approximation vs exact."""
        import pandas as pd

        return pd.DataFrame([asdict(v) for v in self.verified], columns=list(EdgeCheck.__dataclass_fields__))


@dataclass(frozen=True)
class CircuitProgress:
    stage: str          # "attribution" | "verify" | "circuit"
    done: int
    total: int
    elapsed_s: float


class CircuitStream:
    """A running circuit request: iterate for progress; `result` is set by the last message;
    `cancel()` stops the server's work from any thread.

    It reads a stream of CircuitProgress messages ending in the CircuitResult, already converted by the
    serde edge; `cancel` cancels that stream."""

    def __init__(self, messages: Iterable[CircuitProgress | CircuitResult], cancel: Callable[[], Any]):
        self._messages = messages
        self._cancel = cancel
        self.result: CircuitResult | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[CircuitProgress | CircuitResult]:
        for m in self._messages:
            if isinstance(m, CircuitResult):
                self.result = m
            yield m

    def cancel(self) -> None:
        self.cancelled = True
        self._cancel()

    def wait(self, on_progress: Callable[[CircuitProgress], Any] | None = None) -> CircuitResult | None:
        for x in self:
            if isinstance(x, CircuitProgress) and on_progress is not None and on_progress(x) is False:
                self.cancel()
        return self.result


@dataclass
class FlowResult:
    tokens: list[str]
    graph: Graph
    position: int
    threshold: float
    candidate_edges: int
    elapsed_s: float

    def to_pandas(self) -> Any:
        return self.graph.to_pandas()
