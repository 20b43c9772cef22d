"""A model's identity: hashes of its config, weights and tokenizer, computed once per adapter.

Recordings refuse to replay on another model, and activation records and explanations are cached
under it, so all three ask here (model layer: no protobuf, no gRPC)."""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from typing import Any

import torch

from .adapter import _param

_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_FP_LOCK = threading.Lock()
# config keys that save_pretrained or a run may change: bookkeeping, not the model
_BOOKKEEPING = ("_name_or_path", "transformers_version", "_attn_implementation_internal", "_attn_implementation",
                "attn_implementation", "torch_dtype", "dtype", "architectures", "_commit_hash", "use_cache",
                "output_attentions", "output_hidden_states", "return_dict")


def tensor_view(t: torch.Tensor) -> memoryview:
    """A byte view of `t` on the host, without copying when it is already a contiguous CPU tensor."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.numpy()).cast("B")


def fingerprint(adapter: Any) -> dict[str, str]:
    """The model's identity: hashes of its config, weights (every parameter's bytes) and tokenizer."""
    with _FP_LOCK:
        if adapter in _FINGERPRINTS:
            return _FINGERPRINTS[adapter]
        cfg = adapter.model.config.to_dict()
        for key in _BOOKKEEPING:
            cfg.pop(key, None)
        w = hashlib.sha256()
        for mod_name, module in sorted(adapter.model.named_modules(), key=lambda kv: kv[0]):
            for name, _ in sorted(module.named_parameters(recurse=False)):
                p = _param(module, name)   # real weights, also for modules offloaded by a device_map
                w.update(f"{mod_name}.{name}".encode())
                w.update(tensor_view(p))
        tok = adapter.tokenizer
        t = hashlib.sha256()
        if tok is not None:
            t.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
        fp = {"name": adapter.info.name, "architecture": adapter.info.architecture, "dtype": adapter.info.dtype,
              "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
              "weights_sha256": w.hexdigest(), "tokenizer_sha256": t.hexdigest() if tok is not None else ""}
        _FINGERPRINTS[adapter] = fp
        return fp
