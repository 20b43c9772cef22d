"""Prompts as token ids: what every run of the model reads, validated against the model (vocabulary,
length) before any work is done. The engine's launches and every analysis encode through here."""

from __future__ import annotations

from dataclasses import dataclass

from tdb_server.errors import FailedPrecondition, InvalidArgument


@dataclass(frozen=True)
class Prompt:
    """One prompt: text or token ids (not both)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    prepend_bos: bool = False


def decode(adapter, ids: list[int]) -> list[str]:
    return adapter.token_texts(ids)


def decode_text(adapter, ids: list[int]) -> str:
    """The text of a token sequence, decoded as one ("<id> <id>" without a tokenizer)."""
    if adapter.tokenizer is None:
        return " ".join(f"<{i}>" for i in ids)
    return adapter.tokenizer.decode(ids)


CONTEXT = 6     # tokens of context that decide how the last one joins the text (spaces, merged bytes)


def appended_text(adapter, ids: list[int]) -> str:
    """What the last of `ids` adds to `decode_text(ids[:-1])`, decoded in a few tokens of context, so that
    streaming a generation costs the same at every step: a word-level tokenizer's " word" where the token alone
    is "word". Falls back to the token alone where the context's text changes (a merged multi-byte character)."""
    if not ids:
        return ""
    before, both = decode_text(adapter, ids[-CONTEXT - 1:-1]), decode_text(adapter, ids[-CONTEXT - 1:])
    return both[len(before):] if both.startswith(before) else decode(adapter, ids[-1:])[0]


SLACK = 2   # tokenizers may normalise text (NFKC, byte fallback): allow twice the characters a bound says


def _too_long(what: str, size: str, max_tokens: int) -> InvalidArgument:
    return InvalidArgument(f"{what}: {size}; this server takes at most {max_tokens} tokens per prompt "
                           "(tdb serve --max-prompt-tokens)", reason="TOO_LONG")


def tokenize(adapter, text: str, what: str = "input", max_tokens: int = 0) -> list[int]:
    """Token ids of `text` (no special tokens). With `max_tokens`, a text too long to fit is refused before
    the tokenizer sees it (tokenizing costs ~100 bytes of memory per byte of text): no token covers more
    than `adapter.max_token_chars` characters, so a longer text than max_tokens times that cannot fit."""
    tok = adapter.tokenizer
    if tok is None:
        raise FailedPrecondition(f"{what}: this model has no tokenizer: send token_ids", reason="NO_TOKENIZER")
    if max_tokens and len(text) > max_tokens * adapter.max_token_chars * SLACK:
        raise _too_long(what, f"{len(text)} characters, more than {max_tokens} tokens of at most "
                              f"{adapter.max_token_chars} characters each", max_tokens)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def encode(adapter, prompt: Prompt, what: str = "input", max_tokens: int = 0) -> list[int]:
    """Token ids of a prompt, validated (vocabulary, length, non-empty; at most `max_tokens`, the
    server's limit, when given)."""
    tok = adapter.tokenizer
    if prompt.text and prompt.token_ids:
        raise InvalidArgument(f"{what}: give a prompt or token_ids, not both", reason="BAD_INPUT")
    if prompt.text:
        ids = tokenize(adapter, prompt.text, what, max_tokens)
    else:
        if max_tokens and len(prompt.token_ids) > max_tokens:
            raise _too_long(what, f"{len(prompt.token_ids)} tokens", max_tokens)
        ids = [int(i) for i in prompt.token_ids]
    if prompt.prepend_bos:
        bos = getattr(tok, "bos_token_id", None) if tok is not None else None
        if bos is None:
            raise FailedPrecondition(f"{what}: this model has no BOS token", reason="NO_BOS")
        ids = [bos] + ids
    if not ids:
        raise InvalidArgument(f"{what}: nothing to run: give a prompt or token ids", reason="BAD_INPUT")
    check_ids(adapter, ids, what)
    if max_tokens and len(ids) > max_tokens:
        raise _too_long(what, f"{len(ids)} tokens", max_tokens)
    return ids


def unknown_words(adapter, text: str, ids: list[int]) -> list[str]:
    """The pieces of `text` its tokenizer could only write as the unknown token (a word-level vocabulary's
    words it does not know), in order; [] when none did (or the model has no unknown token). Text that is
    the unknown token itself ("<unk>" typed in) is not counted."""
    tok = adapter.tokenizer
    unk = getattr(tok, "unk_token_id", None) if tok is not None else None
    if unk is None or unk not in ids:
        return []
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
    except (NotImplementedError, TypeError, ValueError, KeyError):   # a slow tokenizer keeps no offsets
        pieces = ["?"] * ids.count(unk)
    return [p for p in pieces if p.strip() != tok.unk_token]


def unknown_note(adapter, what: str, words: list[str], n_tokens: int) -> str:
    """A sentence saying that `words` of an input became the model's unknown token ("" for none)."""
    if not words:
        return ""
    shown = ", ".join(repr(w) for w in words[:8]) + (f" and {len(words) - 8} more" if len(words) > 8 else "")
    return (f"{what}: {len(words)} of {n_tokens} tokens are the unknown token {adapter.tokenizer.unk_token!r}: "
            f"{shown} {'is' if len(words) == 1 else 'are'} not in the model's vocabulary, so the model does not "
            f"see {'it' if len(words) == 1 else 'them'} (tokenize the prompt to check; give words it knows)")


def check_ids(adapter, ids: list[int], what: str) -> None:
    vocab = adapter.info.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidArgument(f"{what}: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                              reason="BAD_TOKEN_ID")
    max_pos = adapter.max_positions
    if max_pos and len(ids) > max_pos:
        raise InvalidArgument(f"{what}: {len(ids)} tokens; the model takes at most {max_pos}", reason="TOO_LONG")


def position(pos: int, n: int, what: str = "position") -> int:
    """A python-style index into n positions -> non-negative; InvalidArgument when out of range."""
    if not -n <= pos < n:
        raise InvalidArgument(f"{what} {pos} is out of range for {n} tokens (use 0..{n - 1} or -{n}..-1)",
                              reason="OUT_OF_RANGE")
    return pos % n
