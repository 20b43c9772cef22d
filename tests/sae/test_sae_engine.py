"""SAE latents as units, through the real wire, on a tiny random GPT-2 of this module's own.

The SAE is built here so that latent 0 fires on prompt A and not on prompt B. References are
computed by hand with plain torch hooks on the HF model, never with tdb's SAE code paths."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch

from tdb_client import Breakpoint, Target, TdbClient, TdbError
from tdb_server.model import build_random_model
from tdb_server.sae import Sae, SaeConfig, SaeSplice, attach, attached
from tdb_server.server import create_server

A = [5, 17, 42, 8, 99, 5, 17, 42, 3, 61]
B = [1, 2, 4, 6, 9, 11, 13, 20, 21, 22]
SITE = "blocks.0.resid_post"
LATENT = f"{SITE}.sae.latent.0"
D, K = 32, 16


def _resid(adapter, ids: list[int]) -> torch.Tensor:
    """blocks.0.resid_post [T, D] by a plain forward hook on the first block."""
    out = {}
    h = adapter.model.transformer.h[0].register_forward_hook(
        lambda m, a, o: out.__setitem__("x", (o[0] if isinstance(o, tuple) else o).detach().clone()))
    try:
        with torch.no_grad():
            adapter.model(torch.tensor([ids]))
    finally:
        h.remove()
    return out["x"][0]


@pytest.fixture(scope="module")
def world():
    adapter = build_random_model("gpt2", seed=3)
    g = torch.Generator().manual_seed(11)
    b_dec = torch.randn(D, generator=g) * 0.05
    xa, xb = _resid(adapter, A), _resid(adapter, B)
    best = None
    for t in range(1, len(A)):   # the direction from B's mean to one of A's positions that separates best
        u = xa[t] - xb.mean(0)
        u = u / u.norm()
        pa, pb = ((xa - b_dec) @ u).max(), ((xb - b_dec) @ u).max()
        if best is None or pa - pb > best[1] - best[2]:
            best = (u, pa, pb)
    u, pa, pb = best
    assert pa > pb + 0.05, "test construction: latent 0 must separate the prompts"
    W_enc = torch.randn(D, K, generator=g) * 0.3
    W_enc[:, 0] = u
    b_enc = torch.full((K,), -0.3)
    b_enc[0] = -(pa + pb) / 2
    W_dec = torch.randn(K, D, generator=g) * 0.5
    sae = Sae(SaeConfig("standard", D, K, SITE), W_enc, b_enc, W_dec, b_dec)
    entry = attach(adapter, sae)
    handle, port = create_server("127.0.0.1:0", adapter, data_dirs=[tempfile.gettempdir()])
    client = TdbClient(f"127.0.0.1:{port}", timeout=60)
    yield {"adapter": adapter, "sae": sae, "entry": entry, "client": client,
           "w": {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}}
    client.close()
    handle.stop(grace=None)


def _latents_by_hand(w, x: torch.Tensor) -> torch.Tensor:
    return torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])              # [T, K]


def _logits_with(adapter, ids, edit=None) -> torch.Tensor:
    """Plain HF last-position logits, with blocks.0's output replaced by edit(x) when given."""
    hooks = []
    if edit is not None:
        def hook(m, a, o):
            x = o[0] if isinstance(o, tuple) else o
            new = edit(x[0])[None]
            return (new, *o[1:]) if isinstance(o, tuple) else new
        hooks.append(adapter.model.transformer.h[0].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return adapter.model(torch.tensor([ids])).logits[0, -1].float()
    finally:
        for h in hooks:
            h.remove()


def test_splice_keeps_the_logits(world):
    adapter, sae = world["adapter"], world["sae"]
    ids = torch.tensor([A, B])
    plain = adapter.forward(ids)
    spliced = adapter.forward(ids, SaeSplice({SITE: sae}))
    assert (plain - spliced).abs().max().item() <= 1e-5
    assert adapter.installed_hook_count() == 0
    # the reconstruction alone is not the identity (the error term is what keeps the outputs)
    _, recon = sae.reconstruct(_resid(adapter, A)[None])
    assert (recon[0] - _resid(adapter, A)).abs().max() > 1e-2
    # the quality report on attach
    q = world["entry"].quality
    assert q is not None and q.tokens > 0 and 0 <= q.dead_latents <= K and q.l0 >= 0


def test_zero_ablating_a_latent_equals_doing_it_by_hand(world):
    adapter, w, client = world["adapter"], world["w"], world["client"]

    def by_hand(x):
        a = _latents_by_hand(w, x)
        assert (a[:, 0] > 0).any()
        return x - a[:, :1] * w["W_dec"][0]

    want = _logits_with(adapter, A, by_hand)
    assert (want - _logits_with(adapter, A)).abs().max() > 1e-4      # the ablation does something
    # 1. a debugger patch on the latent unit
    with client.session() as s:
        s.patch(LATENT, "zero")
        st = s.launch(token_ids=[A])
        assert st.state == "exited"
        got = s.result(include_logits=True).last_logits[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    # 2. the literal splice with the latent edited
    spliced = adapter.forward(torch.tensor([A]), SaeSplice({SITE: world["sae"]},
                                                           edit=lambda site, a: a * torch.tensor([0.0] + [1.0] * (K - 1))))
    np.testing.assert_allclose(spliced[0, -1].numpy(), want.numpy(), atol=1e-5, rtol=0)
    # 3. the Ablate analysis (target: the logit of token 7 at the last position)
    r = client.ablate(A, Target([7], kind="logit"), LATENT)
    assert abs(r.after - float(want[7])) <= 1e-4 and abs(r.before - float(_logits_with(adapter, A)[7])) <= 1e-4


def test_a_latent_breakpoint_stops_when_the_latent_fires(world):
    adapter, w, client = world["adapter"], world["w"], world["client"]
    fire_a = _latents_by_hand(w, _resid(adapter, A))[:, 0]
    fire_b = _latents_by_hand(w, _resid(adapter, B))[:, 0]
    assert (fire_a > 0).any() and not (fire_b > 0).any()
    with client.session() as s:
        (bp,) = s.set_breakpoints([LATENT])
        assert bp.verified and bp.sites == (SITE,)
        st = s.launch(token_ids=[B])                       # never fires: runs to the end
        assert st.state == "exited"
        st = s.launch(token_ids=[A])
        assert st.state == "paused" and st.stop.reason == "breakpoint" and st.stop.site == SITE
        x = s.evaluate("x").value                          # the stop's value: the latent's activations [B, T]
        np.testing.assert_allclose(np.asarray(x)[0], fire_a.numpy(), atol=1e-5)
        read = s.evaluate(LATENT).value                    # reads by name too
        np.testing.assert_allclose(np.asarray(read)[0], fire_a.numpy(), atol=1e-5)
        # patch the latent right at the stop: zero it, and the run ends with the by-hand logits
        assert s.patch(LATENT, "zero").applied_now
        st = s.continue_()
        assert st.state == "exited"
        got = s.result(include_logits=True).last_logits[0]
        want = _logits_with(adapter, A, lambda x: x - _latents_by_hand(w, x)[:, :1] * w["W_dec"][0])
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
        # with a condition, the condition decides (here: never)
        s.set_breakpoints([Breakpoint(LATENT, condition="max(x) > 1e9")])
        assert s.launch(token_ids=[A]).state == "exited"
        # no stop, no patch: the logits are the model's own
        s.set_breakpoints([LATENT])
        st = s.launch(token_ids=[B])
        np.testing.assert_allclose(s.result(include_logits=True).last_logits[0], _logits_with(adapter, B).numpy(),
                                   atol=1e-5, rtol=0)
    assert adapter.installed_hook_count() == 0


def test_latent_names_are_checked(world):
    client = world["client"]
    with client.session() as s:
        none_there, too_big = s.set_breakpoints(["blocks.1.resid_post.sae.latent.0", f"{SITE}.sae.latent.{K}"])
        assert not none_there.verified and "no SAE is attached at blocks.1.resid_post" in none_there.message
        assert not too_big.verified and "out of range" in too_big.message
        with pytest.raises(TdbError) as e:
            s.patch("blocks.1.resid_post.sae.latent.0", "zero")
        assert e.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(TdbError):
        client.ablate(A, Target([7], kind="logit"), "blocks.1.mlp.out.sae.latent.3")


def test_node_table_latent_rows_and_their_total_effect_by_autograd(world):
    adapter, sae, w, client = world["adapter"], world["sae"], world["w"], world["client"]
    r = client.node_table(A, Target([7], distractors=[9]), node_types=["sae_latent"], all_rows=True, top_k=5)
    df = r.to_pandas("all")
    assert set(df["node_type"]) == {"sae_latent"} and len(df) == len(A) * K
    assert df["node"].iloc[0].startswith(f"{SITE}.sae.latent.")
    # by hand: splice with the latents as a leaf, gradient of the target through the decoder
    x = _resid(adapter, A)
    a = _latents_by_hand(w, x).requires_grad_(True)                                   # [T, K]
    err = x - (a.detach() @ w["W_dec"] + w["b_dec"])

    def hook(m, args, o):
        new = (a @ w["W_dec"] + w["b_dec"] + err)[None]
        return (new, *o[1:]) if isinstance(o, tuple) else new

    h = adapter.model.transformer.h[0].register_forward_hook(hook)
    try:
        logits = adapter.model(torch.tensor([A])).logits[0, -1]
        (logits[7] - logits[9]).backward()
    finally:
        h.remove()
    want = (a * a.grad).detach()                                                       # [T, K]
    got = np.zeros((len(A), K), np.float32)
    for row in df.itertuples():
        got[row.query_pos, row.index] = row.total_effect
        assert row.activation == pytest.approx(float(a.detach()[row.query_pos, row.index]), abs=1e-5)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    # latent rows overlap the rest: the direct-effect sum is the sum without them
    full = client.node_table(A, Target([7], distractors=[9]), top_k=3)
    assert full.direct_effect_sum == pytest.approx(full.target.value, abs=1e-3)


def test_attach_list_detach_over_the_wire(world, tmp_path):
    client, sae = world["client"], world["sae"]
    (info,) = [i for i in client.list_saes() if i.site == SITE]
    assert info.d_sae == K and info.latent(3) == f"{SITE}.sae.latent.3" and info.quality is not None
    other = Sae(SaeConfig("topk", D, 8, "blocks.1.mlp.out", k=2), torch.randn(D, 8), torch.zeros(8),
                torch.randn(8, D), torch.zeros(D))
    folder = other.save(tmp_path / "mlp_out")
    got = client.attach_sae(str(folder))
    assert got.site == "blocks.1.mlp.out" and got.architecture == "topk" and got.quality.tokens > 0
    assert {i.site for i in client.list_saes()} == {SITE, "blocks.1.mlp.out"}
    client.detach_sae("blocks.1.mlp.out")
    assert set(attached(world["adapter"])) == {SITE}
    with pytest.raises(TdbError) as e:
        client.attach_sae(str(tmp_path / "missing"))
    assert e.value.code.name == "NOT_FOUND"


def test_clients_cannot_make_the_server_read_files_outside_its_data_folders(gpt2_adapter, make_server, tmp_path):
    """Paths a client names (SAE folders, corpora) must lie in the bundled data, the model's folder or a
    --data-dir, after resolving links and '..': activation records would otherwise show any text file."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "corpus.txt").write_text("the cat sat on the mat " * 200)
    secret = tmp_path / "secret.txt"
    secret.write_text("password " * 200)
    (allowed / "link.txt").symlink_to(secret)
    _, addr = make_server(gpt2_adapter, data_dirs=[str(allowed)])
    with TdbClient(addr) as c:
        for path in (str(secret), str(allowed / ".." / "secret.txt"), str(allowed / "link.txt"), "/etc/passwd"):
            for call in (lambda: c.activation_records("blocks.0.mlp.neuron.1", corpus_path=path),
                         lambda: c.explain("blocks.0.mlp.neuron.1", corpus_path=path)):
                with pytest.raises(TdbError) as e:
                    call()
                assert e.value.code.name == "PERMISSION_DENIED" and e.value.reason == "PATH_NOT_ALLOWED", path
                assert "--data-dir" in e.value.message
        with pytest.raises(TdbError) as e:
            c.attach_sae("/etc")
        assert e.value.code.name == "PERMISSION_DENIED"
        with pytest.raises(TdbError) as e:                    # inside an allowed folder: an ordinary answer
            c.attach_sae(str(allowed / "missing"))
        assert e.value.code.name == "NOT_FOUND"
