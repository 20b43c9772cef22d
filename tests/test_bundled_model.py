"""The committed bundled model(s) still have the circuit that ground_truth.json claims.

No training here: load with plain transformers from the package folder, recompute head scores on
freshly drawn repeated random tokens, ablate heads, and run the demo prompt. Head ids come from
ground_truth.json, never from this file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

BUNDLED = Path(__file__).resolve().parents[1] / "tdb_server" / "bundled"
MODEL_DIRS = sorted(p.parent for p in BUNDLED.glob("*/ground_truth.json"))
HALF = 40  # length of the random span; the probe is BOS + r + r


def _truth(path: Path) -> dict:
    return json.loads((path / "ground_truth.json").read_text())


# Models whose ground truth claims a verified circuit / a demo that the circuit answers.
CIRCUIT_DIRS = [p for p in MODEL_DIRS if _truth(p)["circuit_verified"]]
DEMO_DIRS = [
    p for p in CIRCUIT_DIRS
    if _truth(p)["demo"]["top"][0]["id"] == _truth(p)["token_ids"][_truth(p)["demo"]["answer"]][0]
]


def test_bundled_folder_is_small_and_has_heldout_text():
    assert MODEL_DIRS, f"no ground_truth.json under {BUNDLED}"
    total = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert total < 8 * 2**20
    heldout = (BUNDLED / "heldout.txt").read_text(encoding="utf-8")
    assert 100_000 < len(heldout.encode()) < 300_000
    assert CIRCUIT_DIRS, "no bundled model has a verified induction circuit"
    assert DEMO_DIRS, "no bundled model answers its demo prompt"


@pytest.mark.parametrize("path", MODEL_DIRS, ids=lambda p: p.name)
def test_loads_with_sdpa_by_default_and_generates(path):
    model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == model.config.eos_token_id
    truth = _truth(path)
    for word, ids in truth["token_ids"].items():
        assert tokenizer(word)["input_ids"] == ids
    prompt = tokenizer(truth["demo"]["prompt"], return_tensors="pt")["input_ids"]
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape == (1, prompt.shape[1] + 5)


@pytest.fixture(scope="module", params=CIRCUIT_DIRS, ids=lambda p: p.name)
def bundled(request):
    path = request.param
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return model, tokenizer, _truth(path)


def probe(model, tokenizer, seed: int, batch: int = 16) -> torch.Tensor:
    """BOS + r + r, r uniform over non-special tokens. -> [batch, 1 + 2*HALF]"""
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(model.config.vocab_size) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    r = vocab[torch.randint(len(vocab), (batch, HALF), generator=gen)]  # [batch, HALF]
    bos = torch.full((batch, 1), tokenizer.bos_token_id)
    return torch.cat([bos, r, r], dim=1)


@torch.no_grad()
def scores(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Previous-token and induction score per head. -> two [n_layer, n_head] tensors"""
    attns = model(ids, output_attentions=True).attentions  # n_layer x [batch, head, pos, pos]
    pos = torch.arange(1, ids.shape[1])
    second = torch.arange(1 + HALF, 1 + 2 * HALF)
    prev = torch.stack([a[:, :, pos, pos - 1].mean(dim=(0, 2)) for a in attns])
    ind = torch.stack([a[:, :, second, second - HALF + 1].mean(dim=(0, 2)) for a in attns])
    return prev, ind


class zero_heads:
    """Zero-ablate heads at the input of attn.c_proj; hooks removed on exit."""

    def __init__(self, model, heads):
        self.model, self.heads, self.handles = model, [tuple(h) for h in heads], []

    def __enter__(self):
        d_head = self.model.config.n_embd // self.model.config.n_head
        for layer, head in self.heads:

            def pre_hook(module, args, head=head):
                z = args[0].clone()  # [batch, pos, n_head * d_head]
                z[..., head * d_head : (head + 1) * d_head] = 0
                return (z,) + args[1:]

            c_proj = self.model.transformer.h[layer].attn.c_proj
            self.handles.append(c_proj.register_forward_pre_hook(pre_hook))

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def repeat_acc(model, ids) -> float:
    """Top-1 accuracy on the second copy."""
    logits = model(ids).logits[:, HALF : 2 * HALF]
    return (logits.argmax(-1) == ids[:, HALF + 1 :]).float().mean().item()


def test_listed_heads_have_high_scores_on_fresh_tokens(bundled):
    model, tokenizer, truth = bundled
    prev, ind = scores(model, probe(model, tokenizer, seed=99))
    defs = truth["definitions"]
    assert truth["previous_token_heads"] and truth["induction_heads"]
    for layer, head in truth["previous_token_heads"]:
        assert layer == 0
        assert prev[layer, head] >= 0.8 * defs["previous_token_threshold"], (layer, head)
    for layer, head in truth["induction_heads"]:
        assert layer >= 1
        assert ind[layer, head] >= 0.8 * defs["induction_threshold"], (layer, head)
    # Scores recomputed on other random tokens agree with the file.
    assert torch.allclose(ind, torch.tensor(truth["induction_scores"]), atol=0.1)


def test_ablating_induction_heads_hurts_more_than_another_head(bundled):
    model, tokenizer, truth = bundled
    ids = probe(model, tokenizer, seed=7)
    clean = repeat_acc(model, ids)
    assert clean > 0.5
    with zero_heads(model, truth["induction_heads"]):
        without_induction = repeat_acc(model, ids)
    listed = {tuple(h) for h in truth["induction_heads"] + truth["previous_token_heads"]}
    others = [
        (l, h) for l in range(model.config.n_layer) for h in range(model.config.n_head) if (l, h) not in listed
    ]
    other = random.Random(0).choice(others)
    with zero_heads(model, [other]):
        without_other = repeat_acc(model, ids)
    assert clean - without_induction > 0.3
    assert clean - without_induction > 3 * max(clean - without_other, 0.02), other
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("path", DEMO_DIRS, ids=lambda p: p.name)
def test_demo_prompt_predicts_the_repeated_name(path):
    model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    truth = _truth(path)
    demo = truth["demo"]
    ids = torch.tensor([tokenizer(demo["prompt"])["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    (answer,) = tokenizer(demo["answer"])["input_ids"]
    (distractor,) = tokenizer(demo["distractor"])["input_ids"]
    assert logits.argmax().item() == answer
    assert logits[answer] > logits[distractor]
    assert truth["token_ids"][demo["answer"]] == [answer]
    # Swapped and rare names: the recorded top-1 (the repeated name, when induction works) holds.
    for variant in demo["variants"]:
        ids = torch.tensor([tokenizer(variant["prompt"])["input_ids"]])
        with torch.no_grad():
            assert model(ids).logits[0, -1].argmax().item() == variant["top"][0]["id"]


def test_a_batch_mix_without_one_kind_of_row_is_drawn():
    """A training phase may leave out a kind of row (no copied-span windows): the batch is still whole."""
    import sys

    sys.path.insert(0, str(BUNDLED.parents[1] / "scripts"))
    import numpy as np
    import train_bundled

    hp = train_bundled.Hparams(batch=8, seq_len=32, frac_text=0.25, frac_text_repeat=0.0)
    vocab = torch.arange(50)
    gen = torch.Generator().manual_seed(0)
    ids, labels = train_bundled.mixed_batch(gen, hp, 0, np.arange(1000) % 50, vocab)
    assert ids.shape == labels.shape == (8, 32)
    assert (labels[:2] == ids[:2]).all()                   # the two text rows are scored everywhere
    assert (labels[2:] == -100).any(dim=1).all()           # the random repeats only on their copies
