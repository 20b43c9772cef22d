"""progress=True: sweeps, circuits and activation records draw a tqdm bar moved by the progress the
server streams (stages and counts as the server reports them); without it nothing is drawn, and a
caller's own on_progress still gets every message (returning False still cancels a sweep)."""

from __future__ import annotations

import json
import re

from tdb_client import Target
from tdb_server.paths import circuit_model_path

TRUTH = json.loads((circuit_model_path() / "ground_truth.json").read_text())
DEMO = TRUTH["demo"]
PROMPT, CORRUPTED = DEMO["prompt"], DEMO["variants"][0]["prompt"]
TARGET = Target(tokens=[DEMO["answer"]], distractors=[DEMO["distractor"]])


def last_bar(text: str) -> str:
    """The bar as last drawn (tqdm redraws in place with carriage returns)."""
    return [part for part in re.split(r"[\r\n]", text) if part.strip()][-1]


def test_a_sweep_draws_its_stages_to_the_end(bundled_client, capsys):
    seen = []
    r = bundled_client.patch_sweep(PROMPT, CORRUPTED, TARGET, kind="head_out", progress=True,
                                   on_progress=lambda partial: seen.append(partial.progress))
    err = capsys.readouterr().err
    assert r.complete and seen and seen[-1].done == seen[-1].total == 8
    assert "patch sweep: prepare" in err                     # the stages the server reported, in order
    assert last_bar(err).startswith("patch sweep: exact") and "8/8" in last_bar(err) and "100%" in last_bar(err)


def test_no_bar_unless_asked_and_on_progress_still_cancels(bundled_client, capsys):
    r = bundled_client.patch_sweep(PROMPT, CORRUPTED, TARGET, kind="neuron", on_progress=lambda partial: False)
    assert not r.complete and capsys.readouterr().err == ""
    r = bundled_client.patch_sweep(PROMPT, CORRUPTED, TARGET, kind="neuron", progress=True,
                                   on_progress=lambda partial: False)
    assert not r.complete and "patch sweep: " in capsys.readouterr().err


def test_a_circuit_draws_its_three_stages(bundled_client, capsys):
    cue = PROMPT.split().index("Mr")
    broken = " ".join(w if i != cue else "the" for i, w in enumerate(PROMPT.split()))
    r = bundled_client.circuit(PROMPT, broken, TARGET, progress=True)
    err = capsys.readouterr().err
    assert r.circuit.edges and "circuit: attribution" in err and "circuit: verify" in err
    assert last_bar(err).startswith("circuit: circuit") and "3/3" in last_bar(err)


def test_activation_records_draw_the_corpus_windows_read(bundled_client, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TDB_CACHE", str(tmp_path / "cache"))    # an empty cache: the server reads the corpus
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join([PROMPT] * 40))
    r = bundled_client.activation_records("blocks.1.attn.head.3", corpus_path=str(corpus), n_top=2, n_random=1,
                                          window=8, batch=4, progress=True)
    err = capsys.readouterr().err
    n = r.n_windows
    assert not r.cached and last_bar(err).startswith("activation records: windows") and f"{n}/{n}" in last_bar(err)
