"""Targets on a BPE vocabulary (the bundled austen model): the usual slip, a word without its leading
space, is several tokens; the note says which one is used and suggests the spaced word."""

from __future__ import annotations

import pytest

from tdb_server.analyses import TargetSpec, resolve_target
from tdb_server.paths import bundled_models


@pytest.fixture(scope="module")
def austen():
    from tdb_server.model import load_model

    path = bundled_models().get("austen")
    if path is None:
        pytest.skip("the bundled austen model is not there (scripts/train_bundled.py)")
    return load_model(str(path), device="cpu", dtype="float32")


def test_a_word_without_its_leading_space_gets_a_hint(austen):
    ids = austen.tokenizer("Elizabeth looked at Mr. Darcy, and Mr.", add_special_tokens=False)["input_ids"]
    target, _ = resolve_target(austen, TargetSpec(tokens=("Darcy",), distractors=("Bingley",)), ids)
    assert len(target.notes) == 2
    assert "using its first token 'D'" in target.notes[0] and "did you mean ' Darcy'?" in target.notes[0]
    spaced, _ = resolve_target(austen, TargetSpec(tokens=(" Darcy",), distractors=(" Bingley",)), ids)
    assert not spaced.notes


@pytest.fixture(scope="module")
def induction():
    from tdb_server.model import load_model

    path = bundled_models().get("induction")
    if path is None:
        pytest.skip("the bundled induction model is not there (scripts/train_bundled.py)")
    return load_model(str(path), device="cpu", dtype="float32")


def test_a_word_level_target_of_two_words_is_named_with_its_space(induction):
    """A word-level vocabulary: 'Darcy and' is two words; the note writes them as typed, and suggests no
    spaced form that would be the unknown token."""
    ids = induction.tokenizer("When Mr. Darcy entered the room, Mr.", add_special_tokens=False)["input_ids"]
    target, _ = resolve_target(induction, TargetSpec(tokens=("Darcy and",), distractors=("Bingley",)), ids)
    assert target.notes[0] == "'Darcy and' is 2 tokens: using its first token 'Darcy'"
    assert target.notes[1].startswith("5 of 7 prompt tokens are the unknown token")   # "When", "Mr.", "room,", ...
    shared, _ = resolve_target(induction, TargetSpec(tokens=("Darcy and",), distractors=("Darcy the",)), ids)
    assert "share the prefix 'Darcy'" in shared.notes[0]
