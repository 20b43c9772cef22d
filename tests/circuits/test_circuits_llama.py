"""Circuits on other families: Llama (RoPE, GQA, gated MLP, RMSNorm) against plain-torch forward hooks
on the HF modules, and GPT-NeoX (parallel blocks) for the edge-ablation identities."""

from __future__ import annotations

import pytest
import torch

from tdb_server.analyses import circuits as C
from tdb_server.analyses.inputs import Target
from tdb_server.model import build_random_model


@pytest.fixture(scope="module")
def llama():
    return build_random_model("llama", seed=3)


def _case(a, T=8):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, a.info.vocab_size, (T,), generator=gen).tolist()
    bad = list(ids)
    bad[1], bad[4] = (bad[1] + 5) % a.info.vocab_size, (bad[4] + 17) % a.info.vocab_size
    return ids, bad, Target("logit_diff", [ids[2]], [ids[0]], T - 1)


def _plain(model, ids, edit=None):
    """Plain HF forward with torch hooks: -> (target logits row, writes [S, T, D]); `edit(layer, handles)`
    may add hooks of its own. Writes: embed, then per layer each head's o_proj slice, then the MLP."""
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.hidden_size
    Dh = D // H
    writes, handles = {}, []
    m = model.model
    handles.append(m.embed_tokens.register_forward_hook(lambda mod, i, o: writes.__setitem__("embed", o[0])))
    for L, blk in enumerate(m.layers):
        def o_in(mod, args, L=L):
            z = args[0][0]                                                     # [T, H*Dh]
            W = mod.weight                                                     # [D, H*Dh]
            writes[(L, "heads")] = torch.stack([z[:, h * Dh:(h + 1) * Dh] @ W[:, h * Dh:(h + 1) * Dh].T
                                                for h in range(H)])
        handles.append(blk.self_attn.o_proj.register_forward_pre_hook(o_in))
        handles.append(blk.mlp.register_forward_hook(lambda mod, i, o, L=L: writes.__setitem__((L, "mlp"), o[0])))
    if edit:
        handles += edit(model)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    rows = [writes["embed"][None]]
    for L in range(cfg.num_hidden_layers):
        rows += [writes[(L, "heads")], writes[(L, "mlp")][None]]
    return logits, torch.cat(rows)


def test_llama_path_patching_equals_plain_torch_hooks(llama):
    a = llama
    ids, bad, target = _case(a)
    scores = C.edge_attribution(a, ids, target, bad)
    topo = scores.topology
    assert any(r.node.startswith("blocks.1.attn.kv_head.") for r in topo.receivers)   # GQA: 2 KV heads
    cfg = a.model.config
    Dh = cfg.hidden_size // cfg.num_attention_heads
    clean_logits, clean_w = _plain(a.model, ids)
    _, bad_w = _plain(a.model, bad)
    delta = bad_w - clean_w
    assert torch.allclose(scores.clean.writes, clean_w, atol=1e-5)
    edges = [("embed", "blocks.1.attn.head.3.q"), ("blocks.0.attn.head.1", "blocks.1.attn.kv_head.1.k"),
             ("blocks.0.mlp", "blocks.1.attn.kv_head.0.v"), ("blocks.0.attn.head.2", "blocks.0.mlp"),
             ("blocks.1.attn.head.0", "logits")]
    idx = [(topo.sender_index(s), topo.receiver_index(r)) for s, r in edges]
    exact = C.path_patch(a, scores, idx)
    clean = float(target.read_rows(clean_logits[-1:])[0])
    for (s, r), got in zip(idx, exact.tolist()):
        rec, d = topo.receivers[r], delta[s]

        def edit(model, rec=rec, d=d):
            blk = model.model.layers[min(rec.layer, len(model.model.layers) - 1)]
            seen = {}
            if rec.input == "logits":
                return [model.model.norm.register_forward_pre_hook(lambda m, args: (args[0] + d,))]
            if rec.input == "mlp":
                norm = blk.post_attention_layernorm
                hs = [norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))]

                def mlp_out(m, i, o):
                    if seen.get("busy"):
                        return None
                    seen["busy"] = True
                    try:
                        return m(norm(seen["x"] + d))
                    finally:
                        seen["busy"] = False
                return hs + [blk.mlp.register_forward_hook(mlp_out)]
            proj = getattr(blk.self_attn, f"{rec.input}_proj")
            cols = slice(rec.index * Dh, (rec.index + 1) * Dh)
            hs = [blk.register_forward_pre_hook(lambda m, args, kw: seen.__setitem__("x", kw.get("hidden_states", args[0] if args else None)), with_kwargs=True)]

            def swap(m, i, o):
                o = o.clone()
                o[..., cols] = torch.nn.functional.linear(blk.input_layernorm(seen["x"] + d), m.weight, m.bias)[..., cols]
                return o
            return hs + [proj.register_forward_hook(swap)]

        logits, _ = _plain(a.model, ids, edit)
        want = float(target.read_rows(logits[-1:])[0]) - clean
        assert got == pytest.approx(want, abs=1e-5), edges[idx.index((s, r))]
    assert exact.abs().max() > 1e-5
    assert a.installed_hook_count() == 0


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_edge_ablation_identities(family, llama):
    a = llama if family == "llama" else build_random_model("gpt_neox", seed=4)
    ids, bad, target = _case(a)
    scores = C.edge_attribution(a, ids, target, bad)
    everything = {(int(s), int(r)) for s, r in torch.nonzero(scores.topology.reach).tolist()}
    top = set(scores.edges()[:10])
    full, none, c, pruned = C.faithfulness_values(a, scores, [everything, set(), top, C.prune(scores.topology, top)])
    assert full == pytest.approx(scores.clean_value, abs=1e-5)
    assert none == pytest.approx(scores.ablated_value, abs=1e-5)
    assert c == pytest.approx(pruned, abs=1e-5)
    v = C.verify(a, scores, 8)
    assert len(v.exact) == 8 and torch.isfinite(v.exact).all()


def test_gqa_graph_nodes_come_from_the_topology(llama):
    """Receiver nodes of k / v under GQA are KV heads (kind, index and label from the topology, not
    from parsing the name); every node kind is one the wire knows."""
    ids, bad, target = _case(llama)
    scores = C.edge_attribution(llama, ids, target, bad)
    topo = scores.topology
    kv = [r for r, rec in enumerate(topo.receivers) if rec.input in ("k", "v")]
    edges = [(0, kv[0]), (0, kv[-1]), (0, len(topo.receivers) - 1), (topo.sender_index("blocks.0.mlp"), kv[-1])]
    g = C.circuit_graph(scores, edges)
    by_id = {n.id: n for n in g.nodes}
    last = topo.receivers[kv[-1]]
    assert llama.info.n_kv_heads < llama.info.n_heads
    assert by_id[last.node].kind == "kv_head" and by_id[last.node].index == last.index
    assert by_id[last.node].label == f"KVL{last.layer}H{last.index}"
    assert by_id["blocks.0.mlp"].label == "MLP0" and by_id["embed"].layer == -1
    assert by_id["logits"].layer == llama.info.n_layers
    assert {n.kind for n in g.nodes} <= {"embed", "head", "kv_head", "mlp", "logits"}
