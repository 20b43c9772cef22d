"""Analyses over the wire on tiny random GPT-2 and Llama models, checked against plain torch.

Every number the server reports is recomputed here independently: logits from the HF model with no
tdb hooks, gradients from torch autograd with hooks written in this file, ablations by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdb_client import Target, TdbClient, TdbError, Trace
from tdb_server.analyses import TargetSpec, analysis_names, resolve_target
from tdb_server.analyses.node_table import TargetObjective, compute_node_table
from tdb_server.model import build_random_model
from tdb_server.model.arch import get_path
from tdb_server.server import create_server

IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
A, B = 5, 7
FAMILIES = ["gpt2", "llama"]


@pytest.fixture(scope="module", params=FAMILIES)
def served(request):
    """(adapter, client) for a tiny random model with large-ish weights (so effects are not tiny)."""
    adapter = build_random_model(request.param, seed=0, initializer_range=0.2)
    handle, port = create_server("127.0.0.1:0", adapter)
    with TdbClient(f"127.0.0.1:{port}", timeout=60) as client:
        yield adapter, client
    handle.stop(grace=None)
    assert adapter.installed_hook_count() == 0, "an analysis left tdb hooks on the model"


# --- plain torch references (no tdb code) ------------------------------------------------------

def plain_logits(adapter, ids, pre_hooks=()) -> torch.Tensor:
    """HF logits [T, V] with optional forward-pre-hooks [(module, fn)] installed by hand."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in pre_hooks]
    try:
        with torch.no_grad():
            return adapter.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()


def out_proj(adapter, layer):
    return get_path(adapter.blocks[layer], adapter.spec.attn_out_proj)


def down_proj(adapter, layer):
    return get_path(adapter.blocks[layer], adapter.spec.mlp_out_proj)


def autograd_act_x_grad(adapter, ids, position):
    """act x grad of logit(A) - logit(B) at `position` for every head [L, T, H] and neuron [L, T, N],
    with hooks on the output / down projections that swap in a leaf-like clone."""
    info = adapter.info
    z, post, handles = {}, {}, []

    def keep(store, layer):
        def hook(module, args):
            x = args[0].clone().requires_grad_(True) if not args[0].requires_grad else args[0].clone()
            x.retain_grad()
            store[layer] = x
            return (x,)
        return hook

    for layer in range(info.n_layers):
        handles.append(out_proj(adapter, layer).register_forward_pre_hook(keep(z, layer)))
        handles.append(down_proj(adapter, layer).register_forward_pre_hook(keep(post, layer)))
    try:
        emb = adapter.model.get_input_embeddings()
        x = emb(torch.tensor([ids])).detach().requires_grad_(True)
        logits = adapter.model(inputs_embeds=x, use_cache=False).logits[0, position]
        (logits[A] - logits[B]).backward()
    finally:
        for h in handles:
            h.remove()
    heads = torch.stack([(z[l][0] * z[l].grad[0]).reshape(len(ids), info.n_heads, -1).sum(-1)
                         for l in range(info.n_layers)])
    neurons = torch.stack([post[l][0] * post[l].grad[0] for l in range(info.n_layers)])
    return heads.detach(), neurons.detach()


def rows(table, node_type):
    df = table.to_pandas()
    return df[df.node_type == node_type]


# --- direct effects sum to the target ----------------------------------------------------------

@pytest.mark.parametrize("position", [-1, 4])
def test_direct_effects_sum_to_the_target(served, position):
    adapter, client = served
    r = client.node_table(IDS, Target([A], [B], position=position), all_rows=True)
    logits = plain_logits(adapter, IDS)[position]
    expected = float(logits[A] - logits[B])
    assert r.target.exact and r.target.position == position % len(IDS)
    assert r.target.value == pytest.approx(expected, abs=1e-5)
    df = r.all.to_pandas()
    total = df[df.node_type != "head_pair"].direct_effect.astype(np.float64).sum()
    assert abs(total - expected) < 1e-4
    assert abs(r.direct_effect_sum - expected) < 1e-4
    # every kind of component takes part
    assert {"head", "neuron", "embed_token", "head_pair"} <= set(df.node_type)
    # only the target position has direct effects
    assert (df[(df.query_pos >= 0) & (df.query_pos != r.target.position)].direct_effect == 0).all()


def test_token_pairs_decompose_their_head(served):
    adapter, client = served
    df = client.node_table(IDS, Target([A], [B]), all_rows=True).all.to_pandas()
    heads = df[df.node_type == "head"].set_index(["layer", "index", "query_pos"])
    pairs = df[df.node_type == "head_pair"].groupby(["layer", "index", "query_pos"])
    for col in ("direct_effect", "total_effect"):
        summed = pairs[col].sum().reindex(heads.index)
        np.testing.assert_allclose(summed.values, heads[col].values, atol=2e-5)
    act = pairs["activation"].sum().reindex(heads.index)   # attention probabilities sum to 1
    np.testing.assert_allclose(act.values, 1.0, atol=1e-5)


def test_direction_target_is_exact(served):
    adapter, client = served
    direction = np.random.default_rng(0).standard_normal(adapter.info.d_model).astype(np.float32)
    r = client.node_table(IDS, Target(kind="direction", direction=direction, position=6))
    captured = {}   # the final residual: the last block's output (the final norm's input)
    h = adapter.blocks[-1].register_forward_hook(
        lambda m, a, o: captured.update(x=o[0] if isinstance(o, tuple) else o))
    try:
        plain_logits(adapter, IDS)
    finally:
        h.remove()
    expected = float(captured["x"][0, 6] @ torch.from_numpy(direction))
    assert r.target.value == pytest.approx(expected, abs=1e-4)
    assert r.direct_effect_sum == pytest.approx(expected, abs=1e-4)


def test_logprob_target_is_marked_inexact(served):
    adapter, client = served
    r = client.node_table(IDS, Target([A], kind="logprob"))
    expected = float(torch.log_softmax(plain_logits(adapter, IDS)[-1], -1)[A])
    assert r.target.value == pytest.approx(expected, abs=1e-5)
    assert not r.target.exact


# --- total effects = activation x gradient, by plain autograd --------------------------------

def test_total_effect_is_activation_times_gradient(served):
    adapter, client = served
    r = client.node_table(IDS, Target([A], [B]), all_rows=True, node_types=["head", "neuron"])
    heads, neurons = autograd_act_x_grad(adapter, IDS, -1)
    h = rows(r.all, "head")
    np.testing.assert_allclose(h.total_effect, heads.numpy()[h.layer, h.query_pos, h["index"]], atol=1e-5, rtol=1e-4)
    n = rows(r.all, "neuron")
    np.testing.assert_allclose(n.total_effect, neurons.numpy()[n.layer, n.query_pos, n["index"]], atol=1e-5,
                               rtol=1e-4)
    assert np.abs(h.total_effect).max() > 1e-3   # not trivially zero


def test_wire_matches_in_process(served):
    adapter, client = served
    wire = client.node_table(IDS, Target([A], [B]), all_rows=True)
    target, ids = resolve_target(adapter, TargetSpec(token_ids=(A,), distractor_ids=(B,)), IDS)
    local = compute_node_table(adapter, ids, TargetObjective(target))
    np.testing.assert_array_equal(wire.all.ids, local.table.ids.numpy())
    np.testing.assert_array_equal(wire.all.metrics, local.table.metrics.numpy())
    top = wire.top.column("direct_effect")
    assert (np.diff(top) <= 0).all() and top[0] == local.table.metrics[:, 2].max()
    assert (np.diff(wire.bottom.column("direct_effect")) >= 0).all()


# --- ablations -----------------------------------------------------------------------------

def zero_head_hook(layer_head_dim):
    h, dh = layer_head_dim

    def hook(module, args):
        x = args[0].clone()
        x[..., h * dh:(h + 1) * dh] = 0
        return (x,)
    return hook


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 3)])
def test_zero_ablating_a_head_matches_plain_torch(served, layer, head):
    adapter, client = served
    r = client.ablate(IDS, Target([A], [B]), f"blocks.{layer}.attn.head.{head}")
    clean = plain_logits(adapter, IDS)[-1]
    ablated = plain_logits(adapter, IDS, [(out_proj(adapter, layer), zero_head_hook((head, adapter.info.d_head)))])[-1]
    assert r.before == pytest.approx(float(clean[A] - clean[B]), abs=1e-5)
    assert r.after == pytest.approx(float(ablated[A] - ablated[B]), abs=1e-5)
    assert r.results[0].effect == pytest.approx(r.after - r.before)


def test_separate_ablations_match_one_at_a_time(served):
    adapter, client = served
    sweep = client.ablate(IDS, Target([A], [B]), "blocks.*.attn.head.*", separately=True)
    info = adapter.info
    assert [e.node for e in sweep.results] == [f"blocks.{l}.attn.head.{h}" for l in range(info.n_layers)
                                               for h in range(info.n_heads)]
    for e in sweep.results[:: info.n_heads + 1]:
        one = client.ablate(IDS, Target([A], [B]), e.node)
        assert e.after == pytest.approx(one.after, abs=1e-5)
    assert len(sweep.to_pandas()) == info.n_layers * info.n_heads


def test_mean_and_resample_ablations(served):
    adapter, client = served
    t = Target([A], [B])
    # resampling from the same prompt changes nothing
    same = client.ablate(IDS, t, "blocks.0", method="resample", source=IDS)
    assert same.after == pytest.approx(same.before, abs=1e-5)
    # mean over positions of a neuron == setting it to its mean by hand
    n = 3
    r = client.ablate(IDS, t, f"blocks.0.mlp.neuron.{n}", method="mean")
    acts = {}
    h = down_proj(adapter, 0).register_forward_pre_hook(lambda m, a: acts.update(x=a[0][0, :, n].clone()))
    try:
        plain_logits(adapter, IDS)
    finally:
        h.remove()
    mean = acts["x"].mean()

    def set_mean(module, args):
        x = args[0].clone()
        x[..., n] = mean
        return (x,)
    by_hand = plain_logits(adapter, IDS, [(down_proj(adapter, 0), set_mean)])[-1]
    assert r.after == pytest.approx(float(by_hand[A] - by_hand[B]), abs=1e-5)
    # a reference dataset of the prompt itself gives the same mean
    ref = client.ablate(IDS, t, f"blocks.0.mlp.neuron.{n}", method="mean", reference=[IDS])
    assert ref.after == pytest.approx(r.after, abs=1e-5)
    with pytest.raises(TdbError) as e:
        client.ablate(IDS, t, "blocks.0.attn", method="resample", source=IDS[:4])
    assert e.value.reason == "LENGTH_MISMATCH"


# --- tracing, comparing, lens, attention, input attribution -----------------------------------

def test_trace_upstream_q_plus_k_is_qk(served):
    adapter, client = served
    kw = dict(position=-1, key_position=2, all_rows=True)
    q, k, qk = (client.trace_upstream(IDS, "blocks.1.attn.head.2", part=p, **kw) for p in ("q", "k", "qk"))
    assert q.target.value == pytest.approx(qk.target.value) == pytest.approx(k.target.value)
    np.testing.assert_array_equal(q.all.ids, qk.all.ids)
    te = lambda r: r.all.column("total_effect")  # noqa: E731
    np.testing.assert_allclose(te(q) + te(k), te(qk), atol=1e-5)
    assert set(qk.all.to_pandas().layer) <= {-1, 0}   # only upstream of layer 1


def test_trace_a_neuron_reads_its_pre_activation(served):
    adapter, client = served
    n, pos = 5, 6
    r = client.trace_upstream(IDS, f"blocks.1.mlp.neuron.{n}", position=pos, top_k=5)
    pre = {}
    mlp_in = get_path(adapter.blocks[1], adapter.spec.mlp_in)
    h = mlp_in.register_forward_hook(lambda m, a, o: pre.update(x=o[0, pos, n].item()))
    try:
        plain_logits(adapter, IDS)
    finally:
        h.remove()
    assert r.target.value == pytest.approx(pre["x"], abs=1e-5)
    assert r.rank_by == "total_effect" and len(r.top) == 5
    v = client.trace_upstream(IDS, "blocks.1.attn.head.0", part="v")
    out = client.trace_upstream(IDS, "blocks.1.attn.head.0", part="output")
    assert v.target.value == pytest.approx(out.target.value, rel=1e-4)


def test_compare_two_prompts(served):
    adapter, client = served
    other = IDS[:5] + [1, 2, 3, 4, 5]
    c = client.compare(IDS, other, Target([A], [B]), all_rows=True)
    left = client.node_table(IDS, Target([A], [B]), all_rows=True)
    np.testing.assert_allclose(c.all.left, left.all.metrics, atol=1e-6)
    diff = c.top.diff[:, 2]
    assert (np.diff(diff) <= 0).all()
    df = c.top.to_pandas()
    assert {"left_direct_effect", "diff_direct_effect", "right_direct_effect"} <= set(df.columns)
    same = client.compare(IDS, IDS, Target([A], [B]))
    assert np.abs(same.top.diff).max() == 0
    with pytest.raises(TdbError) as e:
        client.compare(IDS, IDS[:-1], Target([A], [B]))
    assert e.value.code.name == "INVALID_ARGUMENT" and "different token lengths" in e.value.message


def test_logit_lens(served):
    adapter, client = served
    last = f"blocks.{adapter.info.n_layers - 1}.resid_post"
    r = client.logit_lens(IDS, target=Target([A], [B]), top_k=3)
    assert r.sites == ("embed", *(f"blocks.{l}.resid_post" for l in range(adapter.info.n_layers)))
    logits = plain_logits(adapter, IDS)
    np.testing.assert_allclose(r.top_logits[-1, :, 0], logits.max(-1).values.numpy(), atol=1e-4)
    np.testing.assert_array_equal(r.top_ids[-1, :, 0], logits.argmax(-1).numpy())
    np.testing.assert_allclose(r.target_values[-1], (logits[:, A] - logits[:, B]).numpy(), atol=1e-4)
    assert len(r.to_pandas()) == len(r.sites) * len(IDS) * 3
    mid = client.logit_lens(IDS, ["blocks.*.resid_mid", last], positions=[-1])
    assert mid.sites[-1] == last and mid.positions == (len(IDS) - 1,)
    with pytest.raises(TdbError) as e:
        client.logit_lens(IDS, ["blocks.0.attn.pattern"])
    assert e.value.code.name == "INVALID_ARGUMENT"


def test_attention_pattern(served):
    adapter, client = served
    r = client.attention_pattern(IDS, 1, heads=[0, 3])
    assert r.pattern.shape == (2, len(IDS), len(IDS)) and r.heads == (0, 3)
    np.testing.assert_allclose(r.pattern.sum(-1), 1.0, atol=1e-5)
    assert np.triu(r.pattern, 1).max() < 1e-6


def test_input_attribution(served):
    adapter, client = served
    r = client.input_attribution(IDS, Target([A], [B]), steps=64, baseline_token_id=0)
    assert r.integrated_gradients.shape == r.grad_x_input.shape == (len(IDS),)
    gap = r.integrated_gradients.sum() - (r.target.value - r.baseline_value)
    assert abs(gap) < 1e-2 * max(1.0, abs(r.target.value - r.baseline_value))
    # gradient x input by plain autograd
    emb_out = {}
    h = get_path(adapter.model, adapter.spec.embed).register_forward_hook(
        lambda m, a, o: emb_out.update(x=o))
    try:
        x = adapter.model.get_input_embeddings()(torch.tensor([IDS])).detach().requires_grad_(True)
        if adapter.spec.family == "gpt2":
            logits = adapter.model(inputs_embeds=x, use_cache=False).logits[0, -1]
            e = emb_out["x"]
            e.retain_grad()
        else:
            logits = adapter.model(inputs_embeds=x, use_cache=False).logits[0, -1]
            e = x
        (logits[A] - logits[B]).backward()
    finally:
        h.remove()
    np.testing.assert_allclose(r.grad_x_input, (e * e.grad).sum(-1)[0].detach().numpy(), atol=1e-5)
    only = client.input_attribution(IDS, Target([A], [B]), methods=["grad_x_input"])
    assert only.integrated_gradients is None and only.steps == 0


# --- targets and validation ------------------------------------------------------------------

def test_capabilities_list_the_analyses(served):
    _, client = served
    names = client.initialize().analyses
    assert set(analysis_names()) == set(names)
    assert {"node_table", "ablation", "trace_upstream", "compare_prompts", "logit_lens", "input_attribution",
            "token_pair_attribution", "attention_pattern", "direct_logit_attribution"} <= set(names)


@pytest.mark.parametrize("call,reason", [
    (lambda c: c.node_table(IDS, Target([A], [B], position=len(IDS))), "OUT_OF_RANGE"),
    (lambda c: c.node_table(IDS, Target([A], kind="logit_diff")), "BAD_TARGET"),
    (lambda c: c.node_table(IDS, Target([1000])), "BAD_TOKEN_ID"),
    (lambda c: c.node_table([], Target([A])), "BAD_INPUT"),
    (lambda c: c.node_table("text", Target([A])), "NO_TOKENIZER"),
    (lambda c: c.node_table(IDS, Target(kind="direction", direction=np.zeros(3, np.float32))), "BAD_TARGET"),
    (lambda c: c.node_table(IDS, Target([A], direction=np.zeros(3, np.float32))), "BAD_TARGET"),
    (lambda c: c.trace_upstream(IDS, "blocks.7.mlp.neuron.0"), "BAD_NODE"),
    (lambda c: c.trace_upstream(IDS, "blocks.1.mlp.neuron.0", part="q"), "BAD_NODE"),
    (lambda c: c.trace_upstream(IDS, "blocks.1.attn.head.0", part="qk", position=2, key_position=5), "OUT_OF_RANGE"),
    (lambda c: c.ablate(IDS, Target([A]), "blocks.0.attn.hed.1"), "BAD_NODE"),
    (lambda c: c.ablate(IDS, Target([A]), "blocks.*.nothing"), "BAD_NODE"),
    (lambda c: c.ablate(IDS, Target([A]), "blocks.0", method="resample"), "BAD_ABLATION"),
    (lambda c: c.ablate(IDS, Target([A]), "blocks.0", positions=[99]), "OUT_OF_RANGE"),
    (lambda c: c.logit_lens(IDS, ["blocks.0.resid_psot"]), "UNKNOWN_SITE"),
    (lambda c: c.logit_lens(IDS, top_k=-1), "OUT_OF_RANGE"),
    (lambda c: c.attention_pattern(IDS, 5), "OUT_OF_RANGE"),
    (lambda c: c.attention_pattern(IDS, 0, heads=[9]), "OUT_OF_RANGE"),
    (lambda c: c.input_attribution(IDS, Target([A]), steps=5000), "OUT_OF_RANGE"),
    (lambda c: c.input_attribution(IDS, Target([A]), baseline_token_id=10**6), "BAD_TOKEN_ID"),
])
def test_invalid_requests_are_rejected_clearly(served, call, reason):
    _, client = served
    with pytest.raises(TdbError) as e:
        call(client)
    assert e.value.reason == reason, e.value
    assert e.value.code.name in ("INVALID_ARGUMENT", "FAILED_PRECONDITION")


def test_request_fields_are_validated_on_the_wire(served):
    """Requests built by hand (not through the typed client) get INVALID_ARGUMENT, never INTERNAL."""
    from tdb.v1 import analysis_pb2 as apb, common_pb2

    _, client = served
    stub = client._analysis
    ids = apb.Input(token_ids=IDS)
    for req, method in [
        (apb.NodeTableRequest(input=ids), "NodeTable"),                                     # no objective
        (apb.NodeTableRequest(input=ids, target=apb.Target(token_ids=[A], kind=99)), "NodeTable"),
        (apb.NodeTableRequest(input=ids, target=apb.Target(token_ids=[A]), rank_by=42), "NodeTable"),
        (apb.NodeTableRequest(input=ids, target=apb.Target(token_ids=[A]), node_types=[77]), "NodeTable"),
        (apb.NodeTableRequest(input=ids, target=apb.Target(token_ids=[A]), top_k=-1), "NodeTable"),
        (apb.NodeTableRequest(input=apb.Input(prompt="x", token_ids=[1]), target=apb.Target(token_ids=[A])),
         "NodeTable"),
        (apb.AblateRequest(input=ids, ablations=[apb.Ablation(node="blocks.0")]), "Ablate"),      # no target
        (apb.AblateRequest(input=ids, target=apb.Target(token_ids=[A])), "Ablate"),               # no ablations
        (apb.AblateRequest(input=ids, target=apb.Target(token_ids=[A]),
                           ablations=[apb.Ablation(node="blocks.0", method=9)]), "Ablate"),
        (apb.InputAttributionRequest(input=ids), "InputAttribution"),
        (apb.NodeTableRequest(input=ids, target=apb.Target(token_ids=[A], direction=common_pb2.Tensor(dtype=1, shape=[4],
                                                                                                  data=b"x"))),
         "NodeTable"),
    ]:
        with pytest.raises(TdbError) as e:
            stub(method, req)
        assert e.value.code.name == "INVALID_ARGUMENT", (method, req, e.value)
