"""Circuits over the wire: the Circuit stream and InformationFlow, the client's Graph and its exports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from tdb_client import Target, TdbError
from tdb_client.graph import CircuitProgress, Graph
from tdb_server.analyses import circuits as C
from tdb_server.analyses.inputs import Target as ServerTarget

IDS = [5, 17, 42, 8, 63, 17, 42, 8, 63, 21]
BAD = [5, 17, 42, 8, 91, 17, 42, 8, 77, 21]


def test_circuit_stream_matches_in_process(client, gpt2_adapter):
    seen = []
    r = client.circuit(IDS, BAD, Target([42], [17]), verify_top_k=10, fraction=0.7,
                       on_progress=seen.append)
    assert [p.stage for p in seen if isinstance(p, CircuitProgress)] == ["attribution", "verify", "circuit"]
    local = C.edge_attribution(gpt2_adapter, IDS, ServerTarget("logit_diff", [42], [17], len(IDS) - 1), BAD)
    assert r.senders == [s.name for s in local.topology.senders]
    assert np.allclose(r.scores, local.scores.numpy(), atol=1e-6)
    assert r.clean_value == pytest.approx(local.clean_value, abs=1e-6)
    assert len(r.verified) == 10 and np.isfinite(r.spearman)
    assert r.faithfulness >= 0.7 and r.circuit.kind == "circuit" and r.circuit.edges
    assert r.curve[-1][2] == pytest.approx(1.0, abs=1e-4)        # every edge: the clean run
    verified = {(v.sender, v.receiver, v.input): v.exact for v in r.verified}
    for e in r.circuit.edges:                                      # exact values travel on the graph edges
        if (e.source, e.target, e.input) in verified:
            assert e.exact == pytest.approx(verified[(e.source, e.target, e.input)])
    frame = r.edges_frame()
    assert abs(frame.score.iloc[0]) == pytest.approx(np.abs(r.scores).max())
    assert list(r.to_pandas().columns) == ["sender", "receiver", "input", "approx", "exact"]


def test_graph_exports(client):
    r = client.circuit(IDS, BAD, Target([42], [17]), verify_top_k=5)
    g = r.circuit
    assert Graph.from_json(g.to_json()) == g
    root = ET.fromstring(g.to_graphml())
    ns = {"g": "http://graphml.graphdrawing.org/xmlns"}
    assert len(root.findall(".//g:node", ns)) == len(g.nodes)
    assert len(root.findall(".//g:edge", ns)) == len(g.edges)
    nx = pytest.importorskip("networkx")
    G = g.to_networkx()
    assert isinstance(G, nx.MultiDiGraph) and G.number_of_edges() == len(g.edges)
    json.loads(g.to_json())


def test_mean_ablation_needs_no_corrupted_prompt(client):
    r = client.circuit(IDS, None, Target([42], [17]), ablation="mean",
                       verify_top_k=0, skip_circuit=True)
    assert r.ablation == "mean" and not r.verified and not r.circuit.edges
    assert np.abs(r.scores).max() > 0


def test_information_flow(client):
    f = client.information_flow(IDS, threshold=0.02)
    assert f.position == len(IDS) - 1 and f.graph.kind == "information_flow"
    final = f"blocks.1.resid_post@{len(IDS) - 1}"
    assert any(n.id == final for n in f.graph.nodes)
    assert all(0 <= e.effect <= 1 for e in f.graph.edges)
    assert all(f.graph.node(e.source).position <= f.graph.node(e.target).position for e in f.graph.edges)


def test_errors_carry_codes(client):
    with pytest.raises(TdbError) as e:
        client.circuit(IDS, BAD[:-1], Target([42], [17]))
    assert e.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(TdbError) as e:
        client.information_flow(IDS, position=50)
    assert e.value.code.name == "INVALID_ARGUMENT"


def test_advertised(client):
    names = client.initialize().analyses
    assert {"edge_attribution", "path_patching", "circuit", "information_flow"} <= set(names)
