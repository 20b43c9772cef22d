"""Corpora for activation records: a text (the bundled held-out slice by default, or a user's file)
cut into token windows, with a hash that keys the on-disk caches."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tdb_server.errors import FailedPrecondition, InvalidArgument, NotFound
from tdb_server.paths import BUNDLED_DIR

DEFAULT_CORPUS = BUNDLED_DIR / "heldout.txt"
MAX_CORPUS_BYTES = 64 << 20


def cache_dir() -> Path:
    """`$TDB_CACHE`, else `~/.cache/tdb`."""
    return Path(os.environ.get("TDB_CACHE") or Path.home() / ".cache" / "tdb")


@dataclass(frozen=True)
class Corpus:
    name: str          # the file name ("heldout.txt")
    path: str
    text: str
    sha256: str        # of the text's UTF-8 bytes


def load_corpus(path: str | Path | None = None) -> Corpus:
    """The text at `path` (default: the bundled held-out slice)."""
    p = Path(path) if path else DEFAULT_CORPUS
    if not p.is_file():      # the file's name only: where the server keeps it is not the client's to learn
        raise NotFound(f"no corpus file named {p.name!r} there", reason="CORPUS_NOT_FOUND")
    size = p.stat().st_size   # sized before it is read: a huge file is refused without reading it
    if size > MAX_CORPUS_BYTES:
        raise InvalidArgument(f"corpus {p.name} has {size >> 20} MiB; at most {MAX_CORPUS_BYTES >> 20} MiB",
                              reason="CORPUS_TOO_LARGE")
    with p.open("rb") as f:
        data = f.read(MAX_CORPUS_BYTES + 1)   # at most that much, should it have grown since
    if len(data) > MAX_CORPUS_BYTES:
        raise InvalidArgument(f"corpus {p.name} has more than {MAX_CORPUS_BYTES >> 20} MiB", reason="CORPUS_TOO_LARGE")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"corpus {p.name} is not UTF-8 text ({e})", reason="BAD_CORPUS") from None
    return Corpus(p.name, str(p), text, hashlib.sha256(data).hexdigest())


_WINDOWS: dict[tuple[int, str, int], torch.Tensor] = {}


def windows(adapter: Any, corpus: Corpus, window: int, max_windows: int = 0) -> torch.Tensor:
    """The corpus tokenized (no special tokens) and cut into non-overlapping windows -> [n, window] int64.
    The tail shorter than a window is dropped. Cached in memory per (adapter, corpus, window)."""
    tok = adapter.tokenizer
    if tok is None:
        raise FailedPrecondition("this model has no tokenizer: activation records need one to read a corpus",
                                 reason="NO_TOKENIZER")
    if window < 2:
        raise InvalidArgument("window must be at least 2 tokens", reason="OUT_OF_RANGE")
    key = (id(adapter), corpus.sha256, window)
    if key not in _WINDOWS:
        ids = tok(corpus.text, add_special_tokens=False, verbose=False)["input_ids"]
        n = len(ids) // window
        if n == 0:
            raise InvalidArgument(f"corpus {corpus.name} has {len(ids)} tokens, fewer than one window of {window}",
                                  reason="CORPUS_TOO_SMALL")
        _WINDOWS[key] = torch.tensor(ids[:n * window], dtype=torch.long).view(n, window)   # [n, window]
    w = _WINDOWS[key]
    return w[:max_windows] if max_windows else w
