"""Activation records, explanations and the shipped SAE on the bundled models.

Skipped only when a model folder is absent; when it is there, a missing property fails. References
come from plain transformers (hooks on the HF modules) and from ground_truth.json, never from tdb."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tdb_client import Target
from tdb_server.explain import explain
from tdb_server.model import load_model
from tdb_server.paths import BUNDLED_DIR, bundled_models
from tdb_server.records import activation_records

MODELS = bundled_models()
AUSTEN = MODELS.get("austen")
HEADS_DIRS = [p for p in MODELS.values() if (p / "ground_truth.json").is_file()
              and json.loads((p / "ground_truth.json").read_text()).get("induction_heads")]
NEURON = "blocks.1.mlp.neuron.7"


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDB_CACHE", str(tmp_path_factory.mktemp("tdb-cache")))
        yield


@pytest.fixture(scope="module")
def austen():
    if AUSTEN is None:
        pytest.skip("the bundled austen model is not there (scripts/train_bundled.py)")
    return load_model(str(AUSTEN), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def bundled():
    """The default bundled model (austen when present): records and their recomputation hold for any."""
    if not MODELS:
        pytest.skip("no bundled model (scripts/train_bundled.py)")
    path = AUSTEN or next(iter(MODELS.values()))
    return path, load_model(str(path), device="cpu", dtype="float32")


def _neuron_maxima_by_hand(path: Path, layer: int, neuron: int, window: int) -> torch.Tensor:
    """Per-window maximum of mlp.post[..., neuron] over the held-out text, with plain transformers."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    ids = tok((BUNDLED_DIR / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False,
              verbose=False)["input_ids"]
    n = len(ids) // window
    ids = torch.tensor(ids[:n * window]).view(n, window)
    seen = []
    h = model.transformer.h[layer].mlp.c_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][..., neuron]))
    try:
        with torch.no_grad():
            for start in range(0, n, 64):
                model(ids[start:start + 64])
    finally:
        h.remove()
    return torch.cat(seen)                                                        # [n, window]


def test_neuron_records_are_reproducible_and_their_top_is_the_corpus_top(bundled):
    path, adapter = bundled
    r1 = activation_records(adapter, NEURON, n_top=5, n_random=5)
    r2 = activation_records(adapter, NEURON, n_top=5, n_random=5)
    assert not r1.cached and r2.cached                                   # the second read the disk cache
    assert [w.window for w in r1.top] == [w.window for w in r2.top]
    assert [w.window for w in r1.random] == [w.window for w in r2.random]
    assert [w.acts for w in r1.top + r1.random] == [w.acts for w in r2.top + r2.random]
    acts = _neuron_maxima_by_hand(path, 1, 7, r1.window)                   # [n, window]
    assert acts.shape[0] == r1.n_windows
    best = int(acts.max(dim=1).values.argmax())
    top = r1.top[0]
    assert top.window == best and top.max_pos == int(acts[best].argmax())
    assert top.max_act == pytest.approx(float(acts.max()), abs=1e-4)
    assert top.acts == pytest.approx(acts[best].tolist(), abs=1e-4)
    maxima = [w.max_act for w in r1.top]
    assert maxima == sorted(maxima, reverse=True)
    assert list(top.tokens) == [adapter.tokenizer.decode([t]) for t in top.token_ids]


@pytest.mark.parametrize("path", HEADS_DIRS, ids=lambda p: p.name)
def test_local_explanation_recognises_the_model_cards_induction_heads(path, tmp_path):
    truth = json.loads((path / "ground_truth.json").read_text())
    adapter = load_model(str(path), device="cpu", dtype="float32")
    threshold = truth["definitions"]["induction_threshold"]
    small = tmp_path / "slice.txt"     # a user's corpus file: the first 40 kB of the held-out text
    small.write_text((BUNDLED_DIR / "heldout.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    for layer, head in truth["induction_heads"]:
        exp, _ = explain(adapter, f"blocks.{layer}.attn.head.{head}", str(small), n_top=5, n_random=0)
        # the property, computed from patterns: attention to the token after an earlier copy of the current token
        assert exp.attention["induction"] >= threshold, (layer, head, exp.attention)
        assert exp.label == "induction", (layer, head, exp.attention)
        assert "earlier copy of the current token" in exp.text
    # a layer-0 head has no earlier layer to find the copies with: never called an induction head
    exp, _ = explain(adapter, "blocks.0.attn.head.0", str(small), n_top=5, n_random=0)
    assert exp.label != "induction" and exp.attention["induction"] < threshold


def test_neuron_explanation_names_its_tokens_and_scores_them(bundled):
    exp, records = explain(bundled[1], NEURON, n_top=10, n_random=10)
    assert exp.label == "tokens" and exp.top_tokens and exp.promoted and exp.suppressed
    shares = [t.share for t in exp.top_tokens]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-6
    # the leading token really is the most frequent token at the top activations of the records
    peak = max(w.max_act for w in records.top)
    at_top = [w.token_ids[t] for w in records.top for t, a in enumerate(w.acts) if a >= 0.5 * peak]
    assert exp.top_tokens[0].token_id == max(set(at_top), key=at_top.count)
    assert exp.score is not None and -1 <= exp.score <= 1


@pytest.fixture(scope="module")
def austen_client():
    """A server of its own on the austen model (the shared bundled fixtures serve the circuit model)."""
    if AUSTEN is None:
        pytest.skip("the bundled austen model is not there")
    from tdb_client import TdbClient
    from tdb_server.model import load_model
    from tdb_server.server import create_server

    handle, port = create_server("127.0.0.1:0", load_model(str(AUSTEN), device="cpu", dtype="float32"))
    with TdbClient(f"127.0.0.1:{port}") as c:
        yield c
    handle.stop(grace=None)


def test_the_shipped_sae_is_good_and_attached_by_default(austen_client):
    bundled_client = austen_client
    folders = sorted((AUSTEN / "saes").glob("*/cfg.json")) if (AUSTEN / "saes").is_dir() else []
    assert folders, f"no SAE under {AUSTEN / 'saes'}: run scripts/train_sae.py"
    (info,) = [i for i in bundled_client.list_saes() if i.path == str(folders[0].parent)]
    q = info.quality
    assert q.explained_variance >= 0.7 and 1 <= q.l0 <= info.d_in and q.dead_fraction <= 0.25
    assert q.loss_spliced < q.loss_zero
    # its latents are units: records, explanation, and a row of the node table carrying it
    k = 0
    recs = bundled_client.activation_records(info.latent(k), n_top=3, n_random=2)
    while recs.max_act <= 0 and k < info.d_sae - 1:   # a latent that fires on the corpus
        k += 1
        recs = bundled_client.activation_records(info.latent(k), n_top=3, n_random=2)
    exp = bundled_client.explain(info.latent(k), include_records=True)
    assert exp.text and exp.records is not None and exp.records.top[0].window == recs.top[0].window
    w = recs.top[0]
    t = bundled_client.node_table(list(w.token_ids[:w.max_pos + 1]), Target([w.token_ids[0]], kind="logit"),
                                  node_types=["sae_latent"], top_k=2000, rank_by="activation")
    rows = t.top.to_pandas()
    mine = rows[rows["node"] == info.latent(k)]
    assert len(mine) and (mine["explanation"] == exp.text).all()


def test_records_and_explanations_over_the_wire(bundled_client):
    if not MODELS:
        pytest.skip("no bundled model")
    seen = []
    r = bundled_client.activation_records(NEURON, n_top=3, n_random=3, on_progress=lambda d, t: seen.append((d, t)))
    assert len(r.top) == 3 and len(r.random) == 3 and r.top[0].acts.shape == (r.window,)
    assert r.to_pandas().query("is_max")["activation"].max() == pytest.approx(r.max_act, abs=1e-5)
    if not r.cached:
        assert seen and seen[-1][0] == seen[-1][1] == r.n_windows
    e = bundled_client.explain("blocks.0.attn.head.0", use_llm=False)
    assert e.method == "local" and set(e.attention) >= {"induction", "previous_token"}
