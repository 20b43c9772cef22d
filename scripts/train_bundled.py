"""Train the tiny GPT-2 that ships with tdb, and write the ground truth that tests assert.

The bundled model must (1) write recognisable English (Jane Austen's novels) and (2) contain an
induction circuit (a previous-token head in layer 0 feeding induction heads in a later layer) so
the debugger has a known answer to find: "... Mr. Darcy ... Mr." -> " Darcy". A model this small
does not grow induction heads from minutes of novels alone (1,200 steps of Austen windows, a quarter
of them with a copied span, grew none), so the ``austen`` recipe has two phases:

1. ``text``: Austen windows (75%) and Austen windows with a span copied later in the window (25%);
   the model learns English.
2. ``circuit1``, ``circuit2``, ... (``Hparams.then``, empty in today's recipe): the same model, a
   fresh optimizer and schedule, batches of Austen windows, windows with a copied span, and rows of
   random BPE tokens whose spans are each repeated (``r r``, loss only on the copy). The random
   repeats can only be predicted by copying, which is what should grow a previous-token head and
   induction heads while the text keeps the English. Not yet verified on this model (see the
   ``--init``/``--then`` example below to continue the shipped model with such phases).

It writes ``tdb_server/bundled/<name>/``: ``model.safetensors``, ``config.json``, tokenizer files,
``ground_truth.json`` (per-head previous-token and induction scores, the heads above threshold,
head-ablation effects, validation loss, a demo prompt) and ``MODEL_CARD.md``; plus the held-out
text ``tdb_server/bundled/heldout.txt``. Everything is seeded and runs on 2 CPU threads; ``--device cuda``
trains on a GPU instead (deterministic cuBLAS; not yet run on one, and its numbers differ from the CPU's).

    python scripts/train_bundled.py --model austen    # the text phase, then the Hparams.then phases
    python scripts/train_bundled.py --model austen --init tdb_server/bundled/austen --out /tmp/b \
        --then '[{"steps": 400, "frac_text": 0.25, "frac_text_repeat": 0}]'   # circuit phases only
    python scripts/train_bundled.py --steps 200 --out /tmp/bundled   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"

# Thresholds written into ground_truth.json; a head is listed when its score is at least this.
PREV_TOKEN_THRESHOLD = 0.3
INDUCTION_THRESHOLD = 0.3


@dataclass
class Hparams:
    name: str = "austen"
    vocab_size: int = 2048
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256
    seq_len: int = 128
    batch: int = 32
    steps: int = 2000
    warmup_steps: int = 0  # curriculum phase 1: random repeats only
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.05
    frac_text: float = 0.75  # phase 2 batch make-up (rest: text with a copied span, random repeats)
    frac_text_repeat: float = 0.25
    seed: int = 0
    device: str = "cpu"  # where the model trains; batches are drawn on the CPU either way
    then: tuple = ()  # later phases, each a dict of fields replaced; the same model is trained on
    init: str = ""  # a saved model folder to continue from: its weights and tokenizer, no text phase


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(train_txt: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on the training text only."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_txt)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=256
    )


def encode_file(tokenizer: PreTrainedTokenizerFast, path: Path) -> np.ndarray:
    """Token ids of a text file, one paragraph per line, ``\\n`` kept. -> [n_tokens] int64"""
    return np.asarray(tokenizer(path.read_text(encoding="utf-8"))["input_ids"], dtype=np.int64)


# ---------------------------------------------------------------- batches
# Every sampler returns (input_ids [batch, seq], labels [batch, seq]); labels -100 are not scored.


def random_repeats(gen: torch.Generator, batch: int, seq_len: int, vocab: torch.Tensor):
    """BOS, then spans of random tokens each followed by its copy (lengths 8..64), to seq_len."""
    ids = torch.empty(batch, seq_len, dtype=torch.long)
    labels = torch.full((batch, seq_len), -100, dtype=torch.long)
    for b in range(batch):
        row, lab = [int(vocab[0])], [-100]  # vocab[0] is the BOS/EOS id
        while len(row) < seq_len:
            n = int(torch.randint(8, 65, (1,), generator=gen))
            span = vocab[1 + torch.randint(len(vocab) - 1, (n,), generator=gen)].tolist()
            row += span + span
            lab += [-100] * n + span
        ids[b], labels[b] = torch.tensor(row[:seq_len]), torch.tensor(lab[:seq_len])
    return ids, labels


def text_windows(gen: torch.Generator, batch: int, seq_len: int, tokens: np.ndarray):
    """Random windows of the training text. -> ids [batch, seq], labels = ids"""
    starts = torch.randint(len(tokens) - seq_len, (batch,), generator=gen).tolist()
    ids = torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]))
    return ids, ids.clone()


def text_with_repeat(gen: torch.Generator, batch: int, seq_len: int, tokens: np.ndarray):
    """Text windows in which a span (8..48 tokens) is copied over a later part of the window."""
    ids, labels = text_windows(gen, batch, seq_len, tokens)
    for b in range(batch):
        n = int(torch.randint(8, 49, (1,), generator=gen))
        src = int(torch.randint(0, seq_len // 2 - n, (1,), generator=gen))
        dst = int(torch.randint(src + n, seq_len - n, (1,), generator=gen))
        ids[b, dst : dst + n] = ids[b, src : src + n]
        labels[b] = ids[b]
    return ids, labels


def mixed_batch(gen, hp: Hparams, step: int, tokens: np.ndarray, vocab: torch.Tensor):
    """The curriculum: random repeats only until warmup_steps, then a fixed mix."""
    if step < hp.warmup_steps:
        return random_repeats(gen, hp.batch, hp.seq_len, vocab)
    n_text = round(hp.batch * hp.frac_text)
    n_rep_text = round(hp.batch * hp.frac_text_repeat)
    n_rand = hp.batch - n_text - n_rep_text
    parts = [  # a part with no rows draws nothing, so it leaves the random stream as it is
        sample(gen, n, hp.seq_len, data)
        for sample, n, data in (
            (text_windows, n_text, tokens), (text_with_repeat, n_rep_text, tokens), (random_repeats, n_rand, vocab)
        )
        if n > 0
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---------------------------------------------------------------- the synthetic induction model
# A word-level model whose whole training set is "span, then the same span again" (75%) and walks
# on a fixed random bigram graph (25%): the circuit forms in minutes, with readable tokens.

WORDS = (
    "Mr Mrs Miss Darcy Bingley Elizabeth Jane Emma Harriet Elton Weston Knightley Hurst Collins "
    "Wickham Fanny Edmund Anne Elinor Marianne Willoughby Edward Lydia Kitty Bennet Lucas Churchill "
    "Frank Catherine Henry Tilney Crawford Bertram Price Elliot Wentworth the of and to a in was "
    "her it I that not be as he had with for his you she but at is which have all so by my on been "
    "very no could would him me must much more said such any were an this there every what think "
    "know little great good own time man lady day house sister father mother family friend letter "
    "room walk ball dinner heart love marry happy dear young soon never always again well quite "
    "made saw felt gave told came went"
).split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: EOS/BOS then the words above (128 ids), split on whitespace."""
    vocab = {EOS: 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=128
    )


def synthetic_batch(gen: torch.Generator, batch: int, vocab_size: int, successors: torch.Tensor):
    """BOS + r + r (3/4 of rows, loss on the copy) or BOS + bigram walk; |r| in 8..40 per batch."""
    half = int(torch.randint(8, 41, (1,), generator=gen))
    n_rep = batch * 3 // 4
    r = torch.randint(1, vocab_size, (n_rep, half), generator=gen)  # [n_rep, half]
    walks = torch.empty(batch - n_rep, 2 * half, dtype=torch.long)  # [n_walk, 2*half]
    walks[:, 0] = torch.randint(1, vocab_size, (batch - n_rep,), generator=gen)
    for t in range(1, 2 * half):
        pick = torch.randint(successors.shape[1], (batch - n_rep,), generator=gen)
        walks[:, t] = successors[walks[:, t - 1], pick]
    body = torch.cat([torch.cat([r, r], dim=1), walks])  # [batch, 2*half]
    ids = torch.cat([torch.zeros(batch, 1, dtype=torch.long), body], dim=1)  # [batch, 1+2*half]
    labels = ids.clone()
    labels[:n_rep, : 1 + half] = -100
    return ids, labels


# ---------------------------------------------------------------- measurements


def repeated_random_tokens(seed: int, batch: int, half: int, vocab: torch.Tensor) -> torch.Tensor:
    """BOS + r + r with r uniform over ``vocab[1:]``. -> [batch, 1 + 2*half]"""
    gen = torch.Generator().manual_seed(seed)
    r = vocab[1 + torch.randint(len(vocab) - 1, (batch, half), generator=gen)]  # [batch, half]
    bos = torch.full((batch, 1), int(vocab[0]), dtype=torch.long)
    return torch.cat([bos, r, r], dim=1)


@torch.no_grad()
def head_scores(model: GPT2LMHeadModel, ids: torch.Tensor, half: int) -> tuple[list, list]:
    """Per-head previous-token and induction scores on BOS + r + r.

    prev[l][h] = mean over positions i >= 1 of attn[i, i-1].
    induction[l][h] = mean over i in the second copy of attn[i, i - half + 1]: the token after
    the earlier occurrence of the current token.
    """
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attns = model(ids.to(model.device), output_attentions=True).attentions  # n_layer x [batch, head, pos, pos]
    finally:
        model.set_attn_implementation(impl)
    prev, induction = [], []
    second = torch.arange(1 + half, 1 + 2 * half)  # positions of the second copy
    for a in attns:
        pos = torch.arange(1, a.shape[-1])
        prev.append(a[:, :, pos, pos - 1].mean(dim=(0, 2)).tolist())
        induction.append(a[:, :, second, second - half + 1].mean(dim=(0, 2)).tolist())
    return prev, induction


class ZeroHeads:
    """Context manager: zero-ablate heads [(layer, head), ...] at the input of ``attn.c_proj``."""

    def __init__(self, model: GPT2LMHeadModel, heads: list[tuple[int, int]]):
        self.model, self.heads, self.handles = model, heads, []

    def __enter__(self):
        d_head = self.model.config.n_embd // self.model.config.n_head
        for layer, head in self.heads:

            def pre_hook(module, args, head=head):
                z = args[0].clone()  # [batch, pos, n_head * d_head]
                z[..., head * d_head : (head + 1) * d_head] = 0
                return (z,) + args[1:]

            c_proj = self.model.transformer.h[layer].attn.c_proj
            self.handles.append(c_proj.register_forward_pre_hook(pre_hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def repeat_metrics(model: GPT2LMHeadModel, ids: torch.Tensor, half: int) -> dict:
    """Top-1 accuracy and mean loss on predicting the second copy of BOS + r + r."""
    ids = ids.to(model.device)
    logits = model(ids).logits[:, half : 2 * half]  # predicts positions half+1 .. 2*half
    target = ids[:, half + 1 : 2 * half + 1]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
    acc = (logits.argmax(-1) == target).float().mean()
    return {"repeat_acc": round(acc.item(), 4), "repeat_loss": round(loss.item(), 4)}


@torch.no_grad()
def validation_loss(model: GPT2LMHeadModel, tokens: np.ndarray, seq_len: int) -> float:
    """Mean next-token loss (nats) over non-overlapping windows of the held-out text."""
    n = (len(tokens) - 1) // seq_len
    x = torch.from_numpy(tokens[: n * seq_len]).view(n, seq_len)  # [n_windows, seq]
    total = 0.0
    for chunk in x.split(64):
        chunk = chunk.to(model.device)
        total += model(chunk, labels=chunk).loss.item() * len(chunk)
    return total / n


@torch.no_grad()
def top_next(model, tokenizer, prompt: str, k: int = 5, compare: tuple[str, ...] = ()) -> dict:
    """Top-k next tokens for a prompt, and the logits of single-token ``compare`` words."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
    logits = model(ids).logits[0, -1]
    probs = logits.softmax(-1)
    top = probs.topk(k)
    out = {
        "prompt": prompt,
        "top": [
            {"token": tokenizer.decode([i]), "id": int(i), "prob": round(p.item(), 4)}
            for p, i in zip(top.values, top.indices)
        ],
    }
    for word in compare:
        (tid,) = tokenizer(word)["input_ids"]
        out.setdefault("logits", {})[word] = round(logits[tid].item(), 3)
    return out


def generate(model, tokenizer, prompt: str, n: int = 60, seed: int = 0) -> str:
    torch.manual_seed(seed)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
    out = model.generate(
        ids, max_new_tokens=n, do_sample=True, top_k=40, temperature=0.8,
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0])


# ---------------------------------------------------------------- training


def build_model(hp: Hparams, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=hp.vocab_size, n_positions=hp.n_positions, n_embd=hp.n_embd,
        n_layer=hp.n_layer, n_head=hp.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def lr_at(hp: Hparams, step: int) -> float:
    """Linear warm-up over 100 steps, then cosine decay to min_lr."""
    if step < 100:
        return hp.lr * (step + 1) / 100
    t = (step - 100) / max(1, hp.steps - 100)
    return hp.min_lr + 0.5 * (hp.lr - hp.min_lr) * (1 + math.cos(math.pi * t))


def train(hp: Hparams, model, next_batch, heldout: np.ndarray | None, vocab: torch.Tensor, log, phase: str = ""):
    """AdamW on ``next_batch(gen, step) -> (ids, labels)``; logs probe metrics every 100 steps."""
    gen = torch.Generator().manual_seed(hp.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.lr, betas=(0.9, 0.98),
    )
    probe = repeated_random_tokens(hp.seed + 1, 16, 40, vocab)
    t0 = time.time()
    history = []
    for step in range(hp.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(hp, step)
        ids, labels = (t.to(model.device) for t in next_batch(gen, step))
        loss = model(ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == hp.steps - 1:
            model.eval()
            _, ind = head_scores(model, probe, 40)
            rec = {
                **({"phase": phase} if phase else {}),
                "step": step, "loss": round(loss.item(), 3), "s": round(time.time() - t0),
                "max_induction": round(max(max(r) for r in ind[1:]), 3),
                **repeat_metrics(model, probe, 40),
            }
            if heldout is not None and (step % 500 == 0 or step == hp.steps - 1):
                rec["val_loss"] = round(validation_loss(model, heldout[:40_000], hp.seq_len), 3)
            history.append(rec)
            log(json.dumps(rec))
    return history, time.time() - t0


# ---------------------------------------------------------------- ground truth and card


def demo(model, tokenizer, kind: str) -> dict:
    """The debugger demo: the model should complete a repeated name by induction."""
    if kind == "austen":
        base = (
            "When Mr. Darcy entered the room, Elizabeth coloured, and Mrs. Bennet was all civility. "
            "Nobody spoke for some minutes, till at last Mr."
        )
        name, other, made_up = " Darcy", " Bingley", " Tilney"
    else:  # word-level: words are space-separated, no leading-space tokens
        base = "the young lady saw Mr Darcy at the ball and her sister told Miss Bennet that Mr"
        name, other, made_up = "Darcy", "Bingley", "Tilney"
    return {
        "prompt": base,
        "answer": name,
        "distractor": other,
        **top_next(model, tokenizer, base, compare=(name, other)),
        "variants": [  # names swapped, and a name rare in the novels
            top_next(model, tokenizer, base.replace(name.strip(), other.strip()), compare=(name, other)),
            top_next(model, tokenizer, base.replace(name.strip(), made_up.strip()), compare=(name, made_up)),
        ],
    }


def ground_truth(hp, model, tokenizer, val_loss, vocab, history, wall_s) -> dict:
    model.eval()
    half = 40
    ids = repeated_random_tokens(seed=1234, batch=32, half=half, vocab=vocab)
    prev, ind = head_scores(model, ids, half)
    prev_heads = [[0, h] for h, s in enumerate(prev[0]) if s >= PREV_TOKEN_THRESHOLD]
    ind_heads = [
        [l, h] for l in range(1, hp.n_layer) for h, s in enumerate(ind[l]) if s >= INDUCTION_THRESHOLD
    ]
    base = repeat_metrics(model, ids, half)
    ablations = {}
    for l in range(hp.n_layer):
        for h in range(hp.n_head):
            with ZeroHeads(model, [(l, h)]):
                ablations[f"L{l}H{h}"] = repeat_metrics(model, ids, half)
    with ZeroHeads(model, [tuple(x) for x in ind_heads]):
        all_ind = repeat_metrics(model, ids, half)
    with ZeroHeads(model, [tuple(x) for x in prev_heads]):
        all_prev = repeat_metrics(model, ids, half)
    names = ["Darcy", "Bingley", "Elizabeth", "Elton", "Weston", "Knightley", "Tilney", "Mr"]
    if hp.name == "austen":
        names = [" " + w for w in names]
    return {
        "model": hp.name,
        "definitions": {
            "probe": f"BOS + r + r, r = {half} tokens uniform over the vocabulary (BOS excluded), "
            f"batch 32, torch seed 1234",
            "previous_token_score": "mean attention from position i to i-1 (i >= 1)",
            "induction_score": f"mean attention from i in the second copy to i-{half}+1",
            "previous_token_threshold": PREV_TOKEN_THRESHOLD,
            "induction_threshold": INDUCTION_THRESHOLD,
            "ablation": "zero the head's slice of the input to attn.c_proj; metrics on the second copy",
        },
        "previous_token_scores": [[round(s, 4) for s in row] for row in prev],
        "induction_scores": [[round(s, 4) for s in row] for row in ind],
        "previous_token_heads": prev_heads,
        "induction_heads": ind_heads,
        "repeat_metrics": base,
        "ablation": {
            "per_head": ablations,
            "all_induction_heads": all_ind,
            "all_previous_token_heads": all_prev,
        },
        "circuit_verified": bool(
            prev_heads and ind_heads and base["repeat_acc"] - all_ind["repeat_acc"] > 0.3
        ),
        "validation_loss": round(val_loss, 4),
        "token_ids": {w: tokenizer(w)["input_ids"] for w in names},
        "demo": demo(model, tokenizer, hp.name),
        "hparams": asdict(hp),
        "train_wall_s": round(wall_s),
        "history": history,
        "versions": versions(),
    }


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


def model_card(gt: dict, samples: list[str], corpus_sha: dict) -> str:
    hp = gt["hparams"]
    fmt = lambda rows: "\n".join(  # noqa: E731
        f"| L{l} | " + " | ".join(f"{s:.2f}" for s in row) + " |" for l, row in enumerate(rows)
    )
    head_cols = " | ".join(f"H{h}" for h in range(hp["n_head"]))
    sep = "|---" * (hp["n_head"] + 1) + "|"
    d = gt["demo"]
    abl = gt["ablation"]
    if gt["model"] == "austen":
        phase2 = "".join(
            f"""
Then the **circuit{i + 1}** phase continues the same model with a fresh AdamW: {o['steps']} steps
(lr {o['lr']} cosine to {o['min_lr']}, same batch and weight decay), each batch {o['frac_text']:.0%} Austen
windows, {o['frac_text_repeat']:.0%} Austen windows with a copied span and
{1 - o['frac_text'] - o['frac_text_repeat']:.0%} rows of random tokens (uniform over the vocabulary) in which
every span (8-64 tokens) is followed by its copy, loss on the copies only.
"""
            for i, o in enumerate(hp["then"])
        ) + ("""
The random-token rows can only be predicted by copying: the pressure toward previous-token and
induction heads (whether they grew is in the scores below); the Austen windows keep the English.
""" if hp["then"] else "")
        if hp["init"]:
            text_phase = f"""No **text** phase here: the model and tokenizer were continued from `{hp['init']}`
(its own model card says how it was trained)."""
        else:
            text_phase = f"""The **text** phase: {hp['steps']} steps, AdamW (lr {hp['lr']} cosine to {hp['min_lr']}, weight decay
{hp['weight_decay']}), each batch {hp['frac_text']:.0%} Austen windows and {hp['frac_text_repeat']:.0%} Austen windows
with a span (8-48 tokens) copied later in the window."""
        intro = f"""A tiny GPT-2 (`GPT2LMHeadModel`, {hp['n_layer']} layers, {hp['n_head']} heads, d_model {hp['n_embd']},
context {hp['n_positions']}, byte-level BPE vocabulary of {hp['vocab_size']}) trained on Jane
Austen's six novels: the demo default, for reading English and for finding a known circuit in it.
Circuit verified: **{gt['circuit_verified']}** (see below{'' if gt['circuit_verified'] else
'; the circuit ground truth lives in `../induction/`'}). Regenerate with
`python scripts/train_bundled.py --model austen`{f" (continued from `{hp['init']}`)" if hp['init'] else ''}.

## Data

Debian package `r-cran-janeaustenr` 1.0.0 (Project Gutenberg text), read with `rdata` by
`scripts/prepare_corpus.py`: paragraphs one per line, italics underscores removed. The last 4% of
every novel's paragraphs is held out (`../heldout.txt`, never trained on, used for validation).
sha256: train `{corpus_sha['train.txt']}`, heldout `{corpus_sha['heldout.txt']}`.

## Training

Seed {hp['seed']}, 2 CPU threads, batch {hp['batch']} x {hp['seq_len']} tokens, no dropout,
{gt['train_wall_s']} s wall clock for the phases run here (on 2 CPU cores shared with other jobs).
{text_phase}
{phase2}
Validation loss on the held-out text (all of `../heldout.txt`, windows of {hp['seq_len']}):
**{gt['validation_loss']:.3f} nats/token**.
"""
    else:
        intro = f"""A tiny GPT-2 (`GPT2LMHeadModel`, {hp['n_layer']} layers, {hp['n_head']} heads, d_model {hp['n_embd']})
with a word-level vocabulary of {hp['vocab_size']} readable tokens (Austen names and common words),
trained only on synthetic data so that it has a clean, verified induction circuit: the **circuit
ground truth** model. It does not write English. Regenerate with
`python scripts/train_bundled.py --model induction`.

## Training

Seed {hp['seed']}, 2 CPU threads, {hp['steps']} steps of batch {hp['batch']}, AdamW (lr {hp['lr']}
cosine to {hp['min_lr']}), {gt['train_wall_s']} s wall clock. Each batch: 3/4 rows BOS + r + r
(r uniform random words, |r| 8-40, loss on the copy only), 1/4 rows walks on a fixed random graph
with 4 successors per word. Loss on fresh synthetic batches: {gt['validation_loss']:.3f}.
"""
    return f"""# tdb bundled model: `{gt['model']}`

{intro}
## Circuit

Probe: {gt['definitions']['probe']}.
Previous-token score = {gt['definitions']['previous_token_score']}; induction score =
{gt['definitions']['induction_score']}.

Previous-token scores:

| layer | {head_cols} |
{sep}
{fmt(gt['previous_token_scores'])}

Induction scores:

| layer | {head_cols} |
{sep}
{fmt(gt['induction_scores'])}

Previous-token heads (score >= {gt['definitions']['previous_token_threshold']}): {gt['previous_token_heads']}.
Induction heads (score >= {gt['definitions']['induction_threshold']}): {gt['induction_heads']}.

Zero-ablation (repeat accuracy on the second copy; clean {gt['repeat_metrics']['repeat_acc']:.3f}):
""" + "\n".join(
        f"- {k}: {v['repeat_acc']:.3f} (loss {v['repeat_loss']:.2f})" for k, v in abl["per_head"].items()
    ) + f"""
- all induction heads: {abl['all_induction_heads']['repeat_acc']:.3f}
- all previous-token heads: {abl['all_previous_token_heads']['repeat_acc']:.3f}

## Demo

Prompt: `{d['prompt']}`

Top next tokens: {', '.join(f"{t['token']!r} {t['prob']:.3f}" for t in d['top'])}.
logit({d['answer']!r}) - logit({d['distractor']!r}) = {d['logits'][d['answer']] - d['logits'][d['distractor']]:.2f}.

""" + "\n".join(
        f"- `...{v['prompt'][-60:]}` -> " + ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in v["top"][:3])
        for v in d["variants"]
    ) + f"""

Token ids: {', '.join(f"{w!r} {ids}" for w, ids in gt['token_ids'].items())}.

## Samples (temperature 0.8, top-k 40)

""" + "\n\n".join(f"> {s}" for s in samples) + f"""

## Versions

{', '.join(f"{k} {v}" for k, v in gt['versions'].items())}. Weights: safetensors; the config's
attention implementation is `sdpa`; pass `attn_implementation="eager"` to get attention patterns.
"""


def train_austen(hp: Hparams, corpus: Path, log):
    """The English model: byte-level BPE, Austen windows plus windows with a copied span, then the
    ``hp.then`` phases. With ``hp.init`` the text phase is skipped: that folder's model is continued."""
    if hp.init:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(hp.init, local_files_only=True)
    else:
        tokenizer = train_tokenizer(corpus / "train.txt", hp.vocab_size)
    tokens = encode_file(tokenizer, corpus / "train.txt")
    heldout = encode_file(tokenizer, corpus / "heldout.txt")
    # Random-token vocabulary: BOS first, then every ordinary token.
    vocab = torch.tensor(
        [tokenizer.eos_token_id] + [i for i in range(hp.vocab_size) if i != tokenizer.eos_token_id]
    )
    log(f"train {len(tokens)} tokens, heldout {len(heldout)} tokens")
    if hp.init:
        model = GPT2LMHeadModel.from_pretrained(hp.init, local_files_only=True, attn_implementation="sdpa")
    else:
        model = build_model(hp, tokenizer)
    model.to(hp.device)
    history, wall_s = [], 0.0
    phases = [("text", hp)] * (not hp.init) + [(f"circuit{i + 1}", replace(hp, then=(), **o)) for i, o in enumerate(hp.then)]
    for phase, php in phases:  # the same model through every phase; each phase its own optimizer
        log(f"-- phase {phase}: {php}")
        h, s = train(
            php, model, lambda gen, step, php=php: mixed_batch(gen, php, step, tokens, vocab), heldout,
            vocab, log, phase=phase,
        )
        history, wall_s = history + h, wall_s + s
    model.eval()
    val = validation_loss(model, heldout, hp.seq_len)
    return model, tokenizer, vocab, val, history, wall_s


def train_induction(hp: Hparams, log):
    """The synthetic word-level model that carries the circuit ground truth."""
    tokenizer = word_tokenizer()
    vocab = torch.arange(hp.vocab_size)  # id 0 is BOS
    successors = torch.randint(1, hp.vocab_size, (hp.vocab_size, 4), generator=torch.Generator().manual_seed(5))
    model = build_model(hp, tokenizer).to(hp.device)
    history, wall_s = train(
        hp, model, lambda gen, step: synthetic_batch(gen, hp.batch, hp.vocab_size, successors), None, vocab, log
    )
    model.eval()
    gen = torch.Generator().manual_seed(hp.seed + 7)
    with torch.no_grad():
        batches = [synthetic_batch(gen, 64, hp.vocab_size, successors) for _ in range(8)]
        val = sum(
            model(ids.to(hp.device), labels=labels.to(hp.device)).loss.item() for ids, labels in batches
        ) / len(batches)
    return model, tokenizer, vocab, val, history, wall_s


RECIPES = {
    "austen": Hparams(name="austen", steps=1200),
    "induction": Hparams(
        name="induction", vocab_size=len(WORDS) + 1, n_layer=2, n_positions=128, seq_len=81,
        steps=1500, lr=2e-3, min_lr=2e-4, weight_decay=0.01,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=REPO / "tdb_server" / "bundled")
    parser.add_argument("--corpus", type=Path, default=prepare_corpus.DEFAULT_CACHE)
    parser.add_argument("--steps", type=int, help="override the recipe's step count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (the default: 2 threads) or cuda")
    parser.add_argument("--init", type=Path, help="austen: continue this saved model (no text phase)")
    parser.add_argument("--then", type=json.loads, help='austen: the later phases, a JSON list of Hparams '
                        'overrides, e.g. \'[{"steps": 400, "frac_text": 0.25, "frac_text_repeat": 0}]\'')
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.device.startswith("cuda"):  # deterministic cuBLAS (torch.use_deterministic_algorithms)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    corpus_sha = prepare_corpus.prepare(args.corpus)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout.txt").write_bytes((args.corpus / "heldout.txt").read_bytes())

    for name in RECIPES if args.model == "all" else [args.model]:
        hp = RECIPES[name]
        hp.seed = args.seed
        hp.device = args.device
        hp.steps = args.steps or hp.steps
        if name == "austen" and args.init:
            hp.init = str(args.init)
        if name == "austen" and args.then is not None:
            hp.then = tuple(args.then)
        if args.steps:  # a smoke run shortens every phase
            hp.then = tuple({**o, "steps": args.steps} for o in hp.then)
        torch.manual_seed(hp.seed)
        random.seed(hp.seed)
        np.random.seed(hp.seed)
        log(f"== {name}: {hp}")
        if name == "austen":
            model, tokenizer, vocab, val, history, wall_s = train_austen(hp, args.corpus, log)
        else:
            model, tokenizer, vocab, val, history, wall_s = train_induction(hp, log)
        gt = ground_truth(hp, model, tokenizer, val, vocab, history, wall_s)
        if name == "austen":
            prompts = ["It is a truth universally acknowledged", "Mr. Darcy", "Emma was", '"My dear Mr. Bennet,"']
        else:
            prompts = ["Mr Darcy", "the young lady", "Miss Bennet"]
        samples = [generate(model, tokenizer, p, n=40, seed=i) for i, p in enumerate(prompts)]
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        model.to("cpu").save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "ground_truth.json").write_text(json.dumps(gt, indent=1) + "\n")
        (out / "MODEL_CARD.md").write_text(model_card(gt, samples, corpus_sha))
        summary = ("previous_token_heads", "induction_heads", "circuit_verified", "repeat_metrics", "validation_loss")
        log(json.dumps({k: gt[k] for k in summary}))
        log(json.dumps(gt["demo"]))
        log("\n\n".join(samples))


if __name__ == "__main__":
    main()
