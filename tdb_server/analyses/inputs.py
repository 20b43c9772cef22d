"""Prompts and targets: what an analysis reads (token ids) and what it explains (a scalar).

A *target* is a scalar read from one position of one forward pass:

| kind         | value                                                              | linear in the final residual |
|--------------|--------------------------------------------------------------------|------------------------------|
| `logit_diff` | mean logit(tokens) - mean logit(distractors)                       | yes (final norm scale frozen)|
| `logit`      | mean logit(tokens)                                                 | yes                          |
| `logprob`    | mean log p(tokens) (- mean log p(distractors), if any)             | only with distractors        |
| `direction`  | final residual . direction (the input of the final norm)          | yes                          |

Token strings are tokenized without special tokens. A string of several tokens is reduced to the
*first differing token*: when one target and one distractor share a prefix of tokens (" Darcy" vs
" Darcyson"), the shared prefix is appended to the prompt (position must be the last one) and the
first tokens after it are compared; otherwise each multi-token string counts by its first token.
Either way a note says so. Everything else that does not fit is an InvalidArgument.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tdb_server.errors import FailedPrecondition, InvalidArgument
from tdb_server.model.tokens import Prompt, check_ids, decode, encode, position, tokenize

__all__ = ["KINDS", "Prompt", "Target", "TargetSpec", "decode", "encode", "position", "resolve_target"]

KINDS = ("logit_diff", "logit", "logprob", "direction")
MAX_TARGET_TOKENS = 1024   # a target or distractor string (only its first tokens count)


@dataclass(frozen=True)
class TargetSpec:
    """A target as asked for (see the module docstring); `kind` "" = logit_diff with distractors, else logit."""

    kind: str = ""
    tokens: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()
    distractors: tuple[str, ...] = ()
    distractor_ids: tuple[int, ...] = ()
    position: int = -1
    direction: torch.Tensor | None = None   # [D]


@dataclass
class Target:
    """A resolved target: token ids, a non-negative position, how to read it from a forward pass."""

    kind: str
    token_ids: list[int]
    distractor_ids: list[int]
    position: int
    direction: torch.Tensor | None = None   # [D], float32
    description: str = ""
    notes: list[str] = field(default_factory=list)
    appended_ids: list[int] = field(default_factory=list)
    value: float = float("nan")             # filled in by the analysis that ran the prompt

    @property
    def exact(self) -> bool:
        """Do direct effects sum exactly to the value (is the target linear in the final residual)?"""
        return self.kind != "logprob" or bool(self.distractor_ids)

    @property
    def needs_resid(self) -> bool:
        return self.kind == "direction"

    def read(self, logits: torch.Tensor, resid: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, T, V] (and, for `direction`, the final residual resid [B, T, D]) -> [B], float32,
        differentiable."""
        p = self.position
        return self.read_rows(logits[:, p], None if resid is None else resid[:, p])

    def read_rows(self, logits: torch.Tensor, resid: torch.Tensor | None = None) -> torch.Tensor:
        """The target's formula on rows of logits [N, V] (direction: of residual vectors [N, D]) -> [N]."""
        if self.kind == "direction":
            return resid.float() @ self.direction.to(resid.device)
        x = logits.float()                                          # [N, V]
        if self.kind == "logprob":
            x = torch.log_softmax(x, dim=-1)
        value = x[:, self.token_ids].mean(-1)
        if self.distractor_ids:
            value = value - x[:, self.distractor_ids].mean(-1)
        return value

    def final_direction(self, adapter, logits_row: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        """(d [D], constant, normed) such that the target is d . final_norm(resid) + constant when
        `normed` (logit kinds, linearised for logprob), or d . resid when not (direction).
        logits_row [V] is the prediction at the target position (for the logprob gradient)."""
        if self.kind == "direction":
            return self.direction.float(), 0.0, False
        W_U, b_U = adapter.W_U.float(), adapter.b_U.float()      # [D, V], [V]
        d = W_U[:, self.token_ids].mean(1)                        # [D]
        const = b_U[self.token_ids].mean()
        if self.distractor_ids:
            d = d - W_U[:, self.distractor_ids].mean(1)
            const = const - b_U[self.distractor_ids].mean()
        elif self.kind == "logprob":  # d log p(a) / d x = W_U[:, a] - W_U p
            probs = torch.softmax(logits_row.float(), dim=-1).to(W_U.device)
            d = d - W_U @ probs
            const = const - b_U @ probs
        const = const + adapter.final_norm_bias.float() @ d
        return d, float(const), True


def _token_lists(adapter, strings: tuple[str, ...], ids: tuple[int, ...], what: str) -> list[list[int]]:
    seqs = [[int(i)] for i in ids]
    if strings:
        tok = adapter.tokenizer
        for s in strings:
            t = tokenize(adapter, s, what, max_tokens=MAX_TARGET_TOKENS)
            if not t:
                raise InvalidArgument(f"{what}: {s!r} tokenizes to nothing", reason="BAD_TARGET")
            unk = getattr(tok, "unk_token_id", None)
            if unk is not None and unk in t and s.strip() != tok.unk_token:
                raise InvalidArgument(f"{what}: {s!r} is not in the model's vocabulary (it tokenizes to the unknown "
                                      f"token {tok.unk_token!r}); give a word the model knows or a token id",
                                      reason="BAD_TARGET")
            seqs.append(t)
    for seq in seqs:
        check_ids(adapter, seq, what)
    return seqs


def _spaced_hint(adapter, text: str) -> str:
    """BPE vocabularies keep a word's leading space in its token: ' Darcy' may be one token where
    'Darcy' is two. Say so when that is the case (the usual slip in a target)."""
    tok = adapter.tokenizer
    if tok is None or text.startswith(" "):
        return ""
    spaced = tok(" " + text, add_special_tokens=False)["input_ids"]
    unk = getattr(tok, "unk_token_id", None)
    one_known = len(spaced) == 1 and (unk is None or spaced[0] != unk)
    return f" (did you mean {' ' + text!r}? with its leading space it is one token)" if one_known else ""


def _text(adapter, seq: list[int]) -> str:
    """The text of a token sequence as its tokenizer writes it (a word-level vocabulary puts spaces between
    words; the tokens' own texts do not have them)."""
    tok = adapter.tokenizer
    return tok.decode(seq) if tok is not None else "".join(decode(adapter, seq))


def _direction_target(adapter, spec: TargetSpec, n: int) -> Target:
    """final residual . direction at a position."""
    if spec.tokens or spec.token_ids or spec.distractors or spec.distractor_ids:
        raise InvalidArgument("a direction target takes no tokens or distractors", reason="BAD_TARGET")
    d = spec.direction
    if d is None or tuple(d.shape) != (adapter.info.d_model,):
        got = "none" if d is None else list(d.shape)
        raise InvalidArgument(f"a direction target needs a direction of shape [{adapter.info.d_model}] "
                              f"(d_model); got {got}", reason="BAD_TARGET")
    if not torch.isfinite(d).all():
        raise InvalidArgument("the target direction has NaN or Inf entries", reason="BAD_TARGET")
    p = position(spec.position, n, "target position")
    return Target("direction", [], [], p, d.float(), f"final residual . direction at position {p}")


def _split_shared_prefix(adapter, a: list[int], b: list[int], pos_in: int, n: int) -> tuple[int, list[str]]:
    """How many leading tokens a target and a distractor share (to append to the prompt), and the note."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    if k == len(a) or k == len(b):
        raise InvalidArgument(f"target {decode(adapter, a)} and distractor {decode(adapter, b)}: one is a "
                              "prefix of the other, so no token tells them apart", reason="BAD_TARGET")
    if not k:
        return 0, []
    if position(pos_in, n, "target position") != n - 1:
        raise InvalidArgument("target and distractor share their first token(s); they can be told apart "
                              "only after appending the shared prefix, which needs the last position",
                              reason="BAD_TARGET")
    return k, [f"target and distractor share the prefix {_text(adapter, a[:k])!r}: it is "
               f"appended to the prompt and the first differing tokens are compared"]


def _first_token_notes(adapter, seqs: list[list[int]]) -> list[str]:
    notes = []
    for seq in seqs:
        if len(seq) > 1:
            text, first = _text(adapter, seq), decode(adapter, seq[:1])[0]
            notes.append(f"{text!r} is {len(seq)} tokens: using its first token {first!r}"
                         + _spaced_hint(adapter, text))
    return notes


def _describe(adapter, kind: str, tok_ids: list[int], dist_ids: list[int], p: int) -> str:
    fmt = "logprob" if kind == "logprob" else "logit"

    def mean(xs: list[int]) -> str:
        words = [f"{fmt}({w!r})" for w in decode(adapter, xs)]
        return words[0] if len(words) == 1 else f"mean({', '.join(words)})"

    return mean(tok_ids) + (f" - {mean(dist_ids)}" if dist_ids else "") + f" at position {p}"


def _unknown_notes(adapter, ids: list[int]) -> list[str]:
    """A note when the prompt holds the unknown token: words the model does not know, computed on as that token."""
    unk = getattr(adapter.tokenizer, "unk_token_id", None) if adapter.tokenizer is not None else None
    k = ids.count(unk) if unk is not None else 0
    return [f"{k} of {len(ids)} prompt tokens are the unknown token {adapter.tokenizer.unk_token!r} (words the model "
            "does not know, or that token typed in): tokenize the prompt to see which"] if k else []


def resolve_target(adapter, spec: TargetSpec, ids: list[int]) -> tuple[Target, list[int]]:
    """Validate a target against a prompt's ids; returns the target and the ids to run (the prompt,
    plus the shared prefix of multi-token targets when there is one)."""
    kind = spec.kind or ("logit_diff" if (spec.distractors or spec.distractor_ids) else "logit")
    if kind not in KINDS:
        raise InvalidArgument(f"unknown target kind {kind!r}; one of {', '.join(KINDS)}", reason="BAD_TARGET")
    n = len(ids)
    if kind == "direction":
        return _direction_target(adapter, spec, n), ids
    if spec.direction is not None:
        raise InvalidArgument(f"a {kind} target takes no direction (use kind direction)", reason="BAD_TARGET")
    toks = _token_lists(adapter, spec.tokens, spec.token_ids, "target tokens")
    dist = _token_lists(adapter, spec.distractors, spec.distractor_ids, "distractors")
    if not toks:
        raise InvalidArgument(f"a {kind} target needs at least one target token", reason="BAD_TARGET")
    if kind == "logit_diff" and not dist:
        raise InvalidArgument("a logit_diff target needs at least one distractor token", reason="BAD_TARGET")
    notes: list[str] = []
    appended: list[int] = []
    if len(toks) == 1 and len(dist) == 1 and (len(toks[0]) > 1 or len(dist[0]) > 1):
        k, notes = _split_shared_prefix(adapter, toks[0], dist[0], spec.position, n)
        appended = toks[0][:k]
        toks, dist = [toks[0][k:]], [dist[0][k:]]
    notes += _first_token_notes(adapter, [*toks, *dist]) + _unknown_notes(adapter, ids)
    run_ids = ids + appended
    p = len(run_ids) - 1 if appended else position(spec.position, n, "target position")
    tok_ids, dist_ids = [s[0] for s in toks], [s[0] for s in dist]
    return Target(kind, tok_ids, dist_ids, p, None, _describe(adapter, kind, tok_ids, dist_ids, p), notes,
                  appended), run_ids
