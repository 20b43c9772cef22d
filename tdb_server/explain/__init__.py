"""Explanations of neurons, heads and SAE latents: local (no network, local.py) and optionally from an
OpenAI-compatible endpoint (llm.py, off by default). `explain` computes one (records first) and keeps
the latest per unit on disk and in memory, so node-table rows can carry it (`cached_text`).

Cache: `$TDB_CACHE` (or `~/.cache/tdb`) `/explanations/<model fingerprint>/<unit>.json`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

from tdb_server.model.fingerprint import fingerprint
from tdb_server.model.corpus import cache_dir
from tdb_server.records.records import Records, activation_records

from .llm import configured, explain_llm
from .local import Explanation, explain_local, score_tokens

_MEMORY: dict[tuple[str, str], Explanation] = {}
_LOCK = threading.Lock()


def _model_key(adapter: Any) -> str:
    return hashlib.sha256(json.dumps(fingerprint(adapter), sort_keys=True).encode()).hexdigest()[:16]


def _path(adapter: Any, unit: str) -> Path:
    return cache_dir() / "explanations" / _model_key(adapter) / f"{unit}.json"


def _quoted_token_ids(adapter: Any, text: str) -> set[int]:
    """Token ids of the words an explanation quotes ('x' or "x"), for scoring an LLM explanation."""
    ids = set()
    for q in re.findall(r"['\"“‘]([^'\"”’]{1,20})['\"”’]", text):
        for variant in (q, " " + q.strip()):
            enc = adapter.tokenizer.encode(variant, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
    return ids


def explain(adapter: Any, unit: str, corpus: str | None = None, *, use_llm: bool = False,
            records: Records | None = None, **record_kw: Any) -> tuple[Explanation, Records]:
    """Explain a unit from its activation records (computed, or taken from the disk cache)."""
    if records is None:
        records = activation_records(adapter, unit, corpus, **record_kw)
    exp = explain_local(adapter, records)
    if use_llm:
        answer = explain_llm(records, exp.text)
        if answer.text:
            local = exp.text
            exp.method, exp.text = "llm", answer.text
            exp.notes.append(f"local explanation: {local}")
            quoted = _quoted_token_ids(adapter, answer.text) if adapter.tokenizer is not None else set()
            if quoted and exp.label != "induction":
                exp.score = score_tokens(records, quoted)
        else:
            exp.notes.append(answer.error)
    remember(adapter, exp)
    return exp, records


def remember(adapter: Any, exp: Explanation) -> None:
    with _LOCK:
        _MEMORY[_model_key(adapter), exp.unit] = exp
    try:
        p = _path(adapter, exp.unit)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(exp.to_dict()))
        tmp.replace(p)
    except OSError:
        pass   # a read-only cache only costs recomputation


def cached(adapter: Any, unit: str) -> Explanation | None:
    """The latest explanation of `unit` on this model, if one was computed (memory, then disk)."""
    key = (_model_key(adapter), unit)
    with _LOCK:
        if key in _MEMORY:
            return _MEMORY[key]
    p = _path(adapter, unit)
    if p.is_file():
        try:
            exp = Explanation.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        with _LOCK:
            _MEMORY[key] = exp
        return exp
    return None


def cached_text(adapter: Any, unit: str) -> str:
    exp = cached(adapter, unit)
    return exp.text if exp is not None else ""


__all__ = ["Explanation", "cached", "cached_text", "configured", "explain", "explain_llm", "explain_local",
           "remember"]
