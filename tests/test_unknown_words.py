"""Prompt words the model does not know: a word-level tokenizer writes them as its unknown token, and the
model computes on that token. A launch says so (RunStatus.warnings, a TdbWarning, an Output event) instead
of answering as if the words were there; a prompt the model knows says nothing."""

from __future__ import annotations

import warnings

import pytest

from tdb_client import TdbClient, TdbWarning
from tdb_server.model.tokens import unknown_words


def test_the_words_that_became_the_unknown_token_are_named(bundled_adapter):
    text = "the young lady saw Mr Darcy at Pemberley and Xyzzy told Miss Bennet"
    ids = bundled_adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert unknown_words(bundled_adapter, text, ids) == ["Pemberley", "Xyzzy"]
    known = "the young lady saw Mr Darcy"
    assert unknown_words(bundled_adapter, known, bundled_adapter.tokenizer(known)["input_ids"]) == []


def test_the_unknown_token_typed_in_is_not_an_unknown_word(bundled_adapter):
    text = f"the lady saw {bundled_adapter.tokenizer.unk_token}"
    ids = bundled_adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert bundled_adapter.tokenizer.unk_token_id in ids and unknown_words(bundled_adapter, text, ids) == []


def test_a_launch_with_unknown_words_warns_and_says_so_in_its_status_and_events(bundled_server):
    with TdbClient(bundled_server) as c, c.session() as s:
        with pytest.warns(TdbWarning, match=r"'Pemberley' is not in the model's vocabulary"):
            st = s.launch(["the lady saw Mr Darcy", "the lady saw Pemberley"])
        assert len(st.warnings) == 1 and st.warnings[0].startswith("sequence 1: 1 of 4 tokens")
        assert s.status().warnings == st.warnings                   # kept with the run
        outputs = [e for e in s.poll_events()[0] if e.kind == "output"]
        assert [e.text for e in outputs] == list(st.warnings) and outputs[0].data["category"] == "warning"
        with warnings.catch_warnings():
            warnings.simplefilter("error")                          # a prompt the model knows: not a word
            assert s.launch("the lady saw Mr Darcy").warnings == ()


def test_an_analysis_of_a_prompt_with_unknown_words_notes_them(bundled_server):
    with TdbClient(bundled_server) as c:
        table = c.node_table("the lady saw Mr Darcy at Pemberley and Mr", target=" Darcy", direct_only=True,
                             target_position_only=True)
        notes = [n for n in table.target.notes if "unknown token" in n]
        assert notes and notes[0].startswith("1 of 9 prompt tokens are the unknown token")
        clean = c.node_table("the lady saw Mr Darcy and Mr", target=" Darcy", direct_only=True,
                             target_position_only=True)
        assert not [n for n in clean.target.notes if "unknown token" in n]
