"""Circuits against a by-hand plain-torch GPT-2: exact path patching, EAP scores, edge-ablated circuits.

The reference re-implements a (random-weight, HF) GPT-2 forward in plain torch in which every receiver
(a head's q, k or v, an MLP, the logits) reads an input of its own, given by a callback; tdb's split
forward runs the real HF modules through site hooks. They must agree to 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from tdb_server.analyses import circuits as C
from tdb_server.analyses.inputs import Target


def by_hand(adapter, ids, input_for):
    """Plain-torch GPT-2. input_for(receiver name, own input [T, D], writes so far [list of [T, D]]) ->
    the receiver's input. Returns (logits [T, V], writes [S, T, D] in circuits.topology order)."""
    m = adapter.model.transformer
    cfg = adapter.model.config
    T, D, H = len(ids), cfg.n_embd, cfg.n_head
    Dh = D // H
    act = ACT2FN[cfg.activation_function]
    x = m.wte.weight[ids] + m.wpe.weight[:T]
    writes = [x]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for L, blk in enumerate(m.h):
        W, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias                # [D, 3D], [3D]
        Wo, bo = blk.attn.c_proj.weight, blk.attn.c_proj.bias              # [D, D], [D]

        def proj(part, h, inp):
            ln = F.layer_norm(inp, (D,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
            cols = slice(part * D + h * Dh, part * D + (h + 1) * Dh)
            return ln @ W[:, cols] + b[cols]                                 # [T, Dh]

        head_writes = []
        for h in range(H):
            name = f"blocks.{L}.attn.head.{h}"
            q, k, v = (proj(i, h, input_for(f"{name}.{p}", x, writes)) for i, p in enumerate("qkv"))
            s = (q @ k.T) / math.sqrt(Dh)
            a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
            head_writes.append((a @ v) @ Wo[h * Dh:(h + 1) * Dh])           # [T, D]
        writes += head_writes
        mid = x + sum(head_writes) + bo
        mi = input_for(f"blocks.{L}.mlp", mid, writes)
        ln2 = F.layer_norm(mi, (D,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
        out = act(ln2 @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias) @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
        writes.append(out)
        x = mid + out
    final = input_for("logits", x, writes)
    logits = F.layer_norm(final, (D,), m.ln_f.weight, m.ln_f.bias, m.ln_f.eps) @ m.wte.weight.T
    return logits, torch.stack(writes)


def own(name, x, writes):
    return x


@pytest.fixture(scope="module")
def case(gpt2_adapter):
    a = gpt2_adapter
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.info.vocab_size, (9,), generator=gen).tolist()
    bad = list(ids)
    bad[2], bad[5] = (bad[2] + 11) % a.info.vocab_size, (bad[5] + 29) % a.info.vocab_size
    target = Target("logit_diff", [ids[3]], [ids[1]], len(ids) - 1)
    return a, ids, bad, target


def read(target, logits):
    return float(target.read_rows(logits[target.position][None])[0])


def test_by_hand_model_is_gpt2(case):
    a, ids, _, target = case
    with torch.no_grad():
        ref, _ = by_hand(a, ids, own)
        hf = a.forward(torch.tensor([ids]))[0]
    assert torch.allclose(ref, hf, atol=1e-5)


def test_exact_path_patching_equals_by_hand(case):
    a, ids, bad, target = case
    scores = C.edge_attribution(a, ids, target, bad)
    topo = scores.topology
    with torch.no_grad():
        clean_logits, clean_w = by_hand(a, ids, own)
        _, bad_w = by_hand(a, bad, own)
    delta = bad_w - clean_w
    assert torch.allclose(scores.ablated_writes, bad_w, atol=1e-5)
    # every input kind and every sender kind, plus the strongest edges
    wanted = {("embed", "blocks.0.attn.head.1.q"), ("embed", "blocks.1.attn.head.2.k"),
              ("blocks.0.attn.head.3", "blocks.1.attn.head.0.v"), ("blocks.0.attn.head.2", "blocks.0.mlp"),
              ("blocks.0.mlp", "blocks.1.attn.head.1.k"), ("blocks.1.mlp", "logits"),
              ("blocks.1.attn.head.3", "logits"), ("embed", "logits")}
    edges = [(topo.sender_index(s), topo.receiver_index(r)) for s, r in sorted(wanted)]
    edges += [e for e in scores.edges()[:6] if e not in edges]
    exact = C.path_patch(a, scores, edges)
    clean = read(target, clean_logits)
    assert scores.clean_value == pytest.approx(clean, abs=1e-5)
    for (s, r), got in zip(edges, exact.tolist()):
        name = topo.receivers[r].name
        with torch.no_grad():
            logits, _ = by_hand(a, ids, lambda n, x, w: x + delta[s] if n == name else x)
        want = read(target, logits) - clean
        assert got == pytest.approx(want, abs=1e-5), (topo.senders[s].name, name)
    assert exact.abs().max() > 1e-4   # the edges do something


def test_eap_scores_are_gradient_times_delta(case):
    a, ids, bad, target = case
    scores = C.edge_attribution(a, ids, target, bad)
    topo = scores.topology
    names = [r.name for r in topo.receivers]
    eps = {n: torch.zeros(len(ids), a.info.d_model, requires_grad=True) for n in names}
    with torch.enable_grad():
        logits, clean_w = by_hand(a, ids, lambda n, x, w: x + eps[n])
        target.read_rows(logits[target.position][None])[0].backward()
    with torch.no_grad():
        _, bad_w = by_hand(a, bad, own)
    delta = (bad_w - clean_w).detach()
    want = torch.zeros(len(topo.senders), len(names))
    for s, sender in enumerate(topo.senders):
        for r, n in enumerate(names):
            if topo.reach[s, r]:
                want[s, r] = (delta[s] * eps[n].grad).sum()
    assert torch.allclose(scores.scores, want, atol=1e-5)
    assert want.abs().max() > 1e-4
    # unreachable edges (a later sender, a head into its own block's heads) are zero
    assert not scores.scores[~topo.reach].any()


def test_circuit_runs_equal_by_hand_edge_ablation(case):
    a, ids, bad, target = case
    scores = C.edge_attribution(a, ids, target, bad)
    topo = scores.topology
    with torch.no_grad():
        _, bad_w = by_hand(a, bad, own)
    circuit = set(scores.edges()[:12])
    b_O = [blk.attn.c_proj.bias for blk in a.model.transformer.h]

    def ablated_input(n, x, w):
        r = topo.receiver_index(n)
        rec = topo.receivers[r]
        base = sum(bad_w[s] for s in range(len(topo.senders)) if topo.reach[s, r])
        base = base + sum(b_O[L] for L in range(rec.layer) ) + (b_O[rec.layer] if rec.input == "mlp" else 0)
        return base + sum(w[s] - bad_w[s] for s, rr in circuit if rr == r)

    with torch.no_grad():
        logits, _ = by_hand(a, ids, ablated_input)
    everything = {(int(s), int(r)) for s, r in torch.nonzero(topo.reach).tolist()}
    got = C.faithfulness_values(a, scores, [circuit, set(), everything])
    assert got[0] == pytest.approx(read(target, logits), abs=1e-5)
    assert got[1] == pytest.approx(scores.ablated_value, abs=1e-5)   # no edge: the corrupted run
    assert got[2] == pytest.approx(scores.clean_value, abs=1e-5)     # every edge: the clean run


def test_pruning_never_changes_a_circuit_run(case):
    a, ids, bad, target = case
    scores = C.edge_attribution(a, ids, target, bad)
    for k in (3, 10, 25):
        c = set(scores.edges()[:k])
        p = C.prune(scores.topology, c)
        assert p <= c
        full, pruned = C.faithfulness_values(a, scores, [c, p])
        assert full == pytest.approx(pruned, abs=1e-5)


def test_mean_ablation_and_validation(case):
    a, ids, bad, target = case
    scores = C.edge_attribution(a, ids, target, ablation="mean")
    assert scores.ablated_writes.shape == scores.clean.writes.shape
    assert torch.allclose(scores.ablated_writes[:, 0], scores.clean.writes.mean(1), atol=1e-6)
    everything = {(int(s), int(r)) for s, r in torch.nonzero(scores.topology.reach).tolist()}
    assert C.faithfulness_values(a, scores, [everything])[0] == pytest.approx(scores.clean_value, abs=1e-5)
    from tdb_server.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match="same length"):
        C.edge_attribution(a, ids, target, bad[:-1])
    with pytest.raises(InvalidArgument, match="unknown ablation"):
        C.edge_attribution(a, ids, target, bad, ablation="zero")


def test_flow_nodes_are_in_depth_order(case):
    """Within a block: resid_pre, then resid_mid, then resid_post, then by position (this order used to
    depend on the hash seed for the last block's resid_mid and resid_post)."""
    a, ids, _, _ = case
    g = C.information_flow(a, ids, threshold=0.0).graph
    depth = {"resid_pre": 0, "resid_mid": 1, "resid_post": 2}
    keys = [(n.layer, depth[n.kind], n.position) for n in g.nodes]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert g.nodes[-1].id == f"blocks.{a.info.n_layers - 1}.resid_post@{len(ids) - 1}"


def test_no_hooks_left(case):
    a, ids, bad, target = case
    C.edge_attribution(a, ids, target, bad)
    C.information_flow(a, ids)
    assert a.installed_hook_count() == 0
