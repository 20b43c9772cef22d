"""Loading models: a local HF directory (or a name already in the HF cache), or a tiny random one.

Both return a `ModelAdapter`, which wraps the model in eval mode with gradients off for parameters,
switches it to the attention wrapper and runs the parity self-check (see adapter.py).
"""

from __future__ import annotations

import os
import tempfile

import torch

from tdb_server.errors import FailedPrecondition, InvalidArgument, NotFound

from .adapter import ModelAdapter
from .arch import arch_for

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tiny defaults per family for tests and benchmarks; any keyword overrides them.
_SMALL = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=100,
                 bos_token_id=0, eos_token_id=0),
    "llama": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, vocab_size=100),
    "gpt_neox": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     max_position_embeddings=64, vocab_size=100, use_parallel_residual=True),
}
_SMALL["mistral"] = _SMALL["qwen2"] = _SMALL["qwen3"] = _SMALL["llama"]


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no GPU"
        raise FailedPrecondition(f"device {device!r}: no CUDA device is available ({why}); use --device cpu or auto")
    return device


def _dtype(dtype: str):
    if dtype == "auto":
        return "auto"
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype!r} not supported; use auto, {', '.join(_DTYPES)}") from None


def load_model(path_or_name: str, device: str = "auto", dtype: str = "auto",
               self_check: bool = True, device_map: str | dict | None = None,
               offload_folder: str | None = None) -> ModelAdapter:
    """Load a causal LM from a local directory (or a name in the local HF cache; never downloads).
    A model without a tokenizer still loads (`info.has_tokenizer` is False).

    device_map: spread the model over devices with accelerate ("auto", "balanced", or a dict from module
    names to "cuda:0" / "cpu" / "disk"); offload_folder holds "disk" modules. `device` is then ignored."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path_or_name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise NotFound(f"no model at {path_or_name!r}: {e}", reason="MODEL_NOT_FOUND") from e
    arch_for(config.model_type)  # unsupported architecture -> clear error before loading weights
    torch_dtype = _dtype(dtype)   # and a bad dtype or a missing GPU, too
    target = _device(device) if device_map is None else None
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise FailedPrecondition("device_map needs the accelerate package (pip install accelerate)",
                                     reason="NO_ACCELERATE") from None
        if offload_folder is None and (device_map in ("auto", "balanced", "sequential")
                                       or (isinstance(device_map, dict) and "disk" in device_map.values())):
            offload_folder = tempfile.mkdtemp(prefix="tdb-offload-")
        model = AutoModelForCausalLM.from_pretrained(path_or_name, local_files_only=True, dtype=torch_dtype,
                                                     device_map=device_map, offload_folder=offload_folder)
        model = model.eval().requires_grad_(False)
    else:
        model = AutoModelForCausalLM.from_pretrained(path_or_name, local_files_only=True, dtype=torch_dtype)
        model = model.to(target).eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_name, local_files_only=True)
    except Exception:  # no tokenizer files, or an unusable tokenizer: the model is still useful
        tokenizer = None
    if tokenizer is not None and len(tokenizer) <= 1:
        tokenizer = None   # transformers 5 builds an empty tokenizer when a folder has no tokenizer files
    name = os.path.basename(os.path.normpath(path_or_name)) if os.path.isdir(path_or_name) else path_or_name
    return ModelAdapter(model, tokenizer, name=name, self_check=self_check)


def build_random_model(model_type: str, *, seed: int = 0, dtype: str = "float32", device: str = "cpu",
                       attn_implementation: str | None = None, self_check: bool = True,
                       **config) -> ModelAdapter:
    """A randomly initialised model of a supported family from a (tiny by default) config; no
    tokenizer. `config` overrides the defaults, e.g. `n_layer=12, n_embd=768` for GPT-2 small."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch_for(model_type)
    cfg = AutoConfig.for_model(model_type, **{**_SMALL.get(model_type, {}), **config})
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    model = model.to(device=_device(device), dtype=_DTYPES[dtype]).eval().requires_grad_(False)
    return ModelAdapter(model, None, name=f"random-{model_type}", self_check=self_check)
