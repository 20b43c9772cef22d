"""ModelAdapter: the real HF model plus what the debugger needs to talk about it.

It wraps (never re-implements) a `...ForCausalLM` and its tokenizer and gives, the same way for every
supported family: `info` (sizes, dtype, device, sites), weights for direct effects in one layout,
the final norm's frozen-scale linearisation (for exact direct logit attribution), `running(handler)`
(see hooks.py) and `forward`. On construction it switches the model to the attention wrapper and
runs a parity self-check that also marks which sites are `verified` (actually reached).

Weight layout (what analyses rely on; GPT-2's Conv1D [in, out] weights are converted here):

| weight         | shape       | meaning                                                          |
|----------------|-------------|------------------------------------------------------------------|
| `W_O(L)`       | [H, Dh, D]  | per-head output projection: attn.out = sum_h z_h @ W_O[h] + b_O  |
| `b_O(L)`       | [D]         | output projection bias (zeros if none)                           |
| `W_in(L)`      | [N, D]      | row n: what neuron n reads (gated MLP: the gate projection)      |
| `W_out(L)`     | [N, D]      | row n: what neuron n writes: mlp.out = sum_n post_n W_out[n] + b_out |
| `b_out(L)`     | [D]         | down projection bias (zeros if none)                             |
| `W_U`, `b_U`   | [D, V], [V] | unembedding (b_U zeros if none)                                  |
| `W_E`          | [V, D]      | token embedding                                                  |

Final norm, linearised with its scale frozen (exact for the full residual, and additive over any
decomposition of it, which is what direct logit attribution needs):

    final_norm(resid) == final_norm_linear(resid, s) + final_norm_bias,  s = final_norm_scale(resid)
    final_norm_linear(x, s) = center(x) * s * weight      (center: x - mean(x) for LayerNorm,
                                                          identity for RMSNorm)
    s = 1 / sqrt(var(resid) + eps)  (LayerNorm)   or   1 / sqrt(mean(resid^2) + eps)  (RMSNorm)

so logits = sum_c final_norm_linear(c, s) @ W_U + (final_norm_bias @ W_U + b_U) over components c of
the residual stream. Centering is linear, so it distributes over components; the LayerNorm bias is
not attributed to any component and goes to the constant term.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from pathlib import Path
from typing import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from tdb_server.errors import FailedPrecondition

from .arch import ArchSpec, arch_for, get_path
from .capture import Capture, Edit
from .hooks import HookManager, Run, SiteHandler, install_attention_wrapper
from .sites import all_sites, site_shape


class ParityError(FailedPrecondition):
    """The model with our hooks on every site does not reproduce plain HF logits."""

    reason = "PARITY_CHECK_FAILED"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str          # config.model_type
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    dtype: str                 # e.g. "float32"
    device: str                # e.g. "cpu", "cuda:0"
    sites: list[str] = field(default_factory=list)  # all canonical sites, execution order
    parallel_blocks: bool = False                     # attn and MLP both read resid_pre (NeoX)
    has_tokenizer: bool = False
    attn_implementation: str = ""                     # the wrapped one: "sdpa", "eager", ...


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    """A module's parameter, detached. Under accelerate's offloading (device_map with "disk" or CPU offload)
    the module holds a meta tensor between forwards; the real one is read from its hook's weights map."""
    p = getattr(module, name, None)
    if p is None:
        return None
    if p.device.type != "meta":
        return p.detach()
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is None:
        raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device and has no offload map")
    return weights_map[name].detach()


def _in_out(module: nn.Module, spec: ArchSpec) -> torch.Tensor:
    """A projection's weight as [in, out] (nn.Linear stores [out, in]; GPT-2's Conv1D [in, out])."""
    w = _param(module, "weight")
    return w if spec.linear_layout == "conv1d" else w.T


def _bias(module: nn.Module, size: int, like: torch.Tensor) -> torch.Tensor:
    b = _param(module, "bias")
    return b if b is not None else torch.zeros(size, dtype=like.dtype, device=like.device)


class ModelAdapter:
    """A loaded HF causal LM, its tokenizer (or None) and the debugger's view of it."""

    def __init__(self, model: nn.Module, tokenizer=None, *, name: str | None = None,
                 self_check: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        self.spec = arch_for(config.model_type)
        self.blocks = get_path(model, self.spec.blocks)
        n_layers = len(self.blocks)
        n_heads = config.num_attention_heads
        d_model = config.hidden_size
        out_proj = get_path(self.blocks[0], self.spec.attn_out_proj)
        d_head = _in_out(out_proj, self.spec).shape[0] // n_heads
        param = next(model.parameters())
        parallel = bool(self.spec.parallel_attr and getattr(config, self.spec.parallel_attr, False))
        self._final_norm = get_path(model, self.spec.final_norm)
        self._hooks = HookManager(model, self.spec, n_layers, n_heads)
        self._W_out_norms: dict[int, torch.Tensor] = {}     # layer -> [N] (W_out_norms)

        reference = self._self_check_reference() if self_check else None
        original_impl = install_attention_wrapper(model)
        self.info = ModelInfo(
            name=name or getattr(config, "_name_or_path", "") or config.model_type,
            architecture=config.model_type,
            n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            d_model=d_model, d_head=d_head, d_mlp=self.W_out(0).shape[0],
            vocab_size=self.W_U.shape[1],
            dtype=str(param.dtype).removeprefix("torch."), device=str(param.device),
            sites=all_sites(n_layers), parallel_blocks=parallel,
            has_tokenizer=tokenizer is not None, attn_implementation=original_impl,
        )
        self.verified_sites: frozenset[str] = frozenset()
        self.verified_order: tuple[str, ...] = ()
        self.unverified: dict[str, str] = {}  # site -> why it is not verified
        self._token_text: dict[int, str] = {}
        self._max_token_chars: int | None = None
        if self_check:
            self._self_check(*reference)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token id's text on its own ("<id>" without a tokenizer); cached, at most one entry per
        vocabulary item (decoding one id at a time is most of the cost of a logit lens's top tokens)."""
        tok, cache = self.tokenizer, self._token_text
        if tok is None:
            return [f"<{i}>" for i in ids]
        out = []
        for i in ids:
            text = cache.get(i)
            if text is None:
                text = cache[i] = tok.decode([i])
            out.append(text)
        return out

    @functools.cached_property
    def max_positions(self) -> int:
        """The most positions the model takes (0 when its config does not say); read once (every launch
        checks it, and HF's config attributes are slow to read)."""
        cfg = self.model.config
        for key in ("n_positions", "max_position_embeddings"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return 0

    @property
    def max_token_chars(self) -> int:
        """The most characters one token of the tokenizer covers (its longest vocabulary entry): bounds
        how many tokens a text has before tokenizing it (model/tokens.py)."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
            self._max_token_chars = max((len(t) for t in vocab), default=1)
        return self._max_token_chars

    @property
    def model_dir(self) -> Path | None:
        """The folder the model was loaded from (config._name_or_path), if it is a folder."""
        p = getattr(self.model.config, "_name_or_path", "") or ""
        return Path(p) if p and Path(p).is_dir() else None

    # --- running ------------------------------------------------------------------------------

    def running(self, handler: SiteHandler | None) -> contextlib.AbstractContextManager[Run | None]:
        """Context manager: forwards of `self.model` inside it, in this thread, call
        `handler.on_site` for `handler.sites` (see hooks.py). Our hooks are removed on exit."""
        return self._hooks.running(handler)

    def forward(self, input_ids: torch.Tensor, handler: SiteHandler | None = None,
                attention_mask: torch.Tensor | None = None, grad: bool = False,
                logits_at: list[int] | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]; no KV cache. `logits_at` (positions): only those rows are
        projected on the vocabulary, logits [B, len(logits_at), V] (the `logits` site holds those rows too):
        an analysis that reads one position does not pay for T x V logits."""
        device = self.model.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        keep = self.keep_logits(logits_at) if logits_at is not None else {}
        with torch.set_grad_enabled(grad), self.running(handler):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep).logits
        return logits[:, logits_at] if logits_at is not None and not keep else logits

    def keep_logits(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The model's own `logits_to_keep` argument projecting only `rows` (positions) on the vocabulary,
        as keyword arguments of its forward; {} for a model that does not take it (all rows are projected)."""
        if not self._takes_logits_to_keep:
            return {}
        return {"logits_to_keep": torch.tensor(rows, dtype=torch.long, device=self.model.get_input_embeddings().weight.device)}

    @functools.cached_property
    def _takes_logits_to_keep(self) -> bool:
        """Does the HF model's forward take `logits_to_keep` (transformers >= 4.50 causal LMs)?"""
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def run_with_cache(self, input_ids: torch.Tensor, sites: Iterable[str] = (), *, edit: Edit | None = None,
                       edit_sites: Iterable[str] = (), grad_sites: Iterable[str] = (),
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Capture]:
        """input_ids [B, T] -> (logits [B, T, V], the Capture of `sites`): one forward that keeps what it
        computed there (see capture.py; `edit` changes values at `edit_sites` first, `grad_sites` keep
        the autograd graph and enable gradients)."""
        cache = Capture(sites, grad_sites=grad_sites, edit=edit, edit_sites=edit_sites)
        logits = self.forward(input_ids, cache, attention_mask=attention_mask, grad=bool(cache.grad_sites))
        return logits, cache

    def installed_hook_count(self) -> int:
        """Number of our hook handles currently on the model (0 when no run needs any)."""
        return self._hooks.installed_hook_count()

    def close(self) -> None:
        """Give the model back as loaded: the original attention implementation, none of our hooks."""
        if self.installed_hook_count():
            raise FailedPrecondition("cannot close the adapter while runs hold hooks")
        self.model.set_attn_implementation(self.info.attn_implementation)

    # --- weights for direct effects -----------------------------------------------------------

    def W_O(self, layer: int) -> torch.Tensor:
        """[H, Dh, D]: head h writes z_h @ W_O[h]."""
        w = _in_out(get_path(self.blocks[layer], self.spec.attn_out_proj), self.spec)  # [H*Dh, D]
        return w.reshape(self.model.config.num_attention_heads, -1, w.shape[1])       # [H, Dh, D]

    def b_O(self, layer: int) -> torch.Tensor:
        """[D]"""
        proj = get_path(self.blocks[layer], self.spec.attn_out_proj)
        return _bias(proj, self.model.config.hidden_size, _param(proj, "weight"))

    def W_in(self, layer: int) -> torch.Tensor:
        """[N, D]: row n is what neuron n reads (gated MLP: the gate projection)."""
        return _in_out(get_path(self.blocks[layer], self.spec.mlp_in), self.spec).T

    def W_out(self, layer: int) -> torch.Tensor:
        """[N, D]: row n is what neuron n writes."""
        return _in_out(get_path(self.blocks[layer], self.spec.mlp_out_proj), self.spec)

    def W_out_norms(self, layer: int) -> torch.Tensor:
        """[N] float32: |W_out[n]|, how far neuron n writes per unit of activation. Kept once computed (the
        weights never change; a gated MLP's W_out is a transposed view, whose row norms cost ~38 ms a layer of
        a 1.1B Llama on one CPU thread)."""
        norms = self._W_out_norms.get(layer)
        if norms is None:
            norms = self._W_out_norms[layer] = self.W_out(layer).float().norm(dim=-1)
        return norms

    def b_out(self, layer: int) -> torch.Tensor:
        """[D]"""
        proj = get_path(self.blocks[layer], self.spec.mlp_out_proj)
        return _bias(proj, self.model.config.hidden_size, _param(proj, "weight"))

    @property
    def W_U(self) -> torch.Tensor:
        """[D, V]"""
        return _param(self.model.get_output_embeddings(), "weight").T

    @property
    def b_U(self) -> torch.Tensor:
        """[V]"""
        unembed = self.model.get_output_embeddings()
        weight = _param(unembed, "weight")
        return _bias(unembed, weight.shape[0], weight)

    @property
    def W_E(self) -> torch.Tensor:
        """[V, D]"""
        return _param(self.model.get_input_embeddings(), "weight")

    # --- final norm, linearised ---------------------------------------------------------------

    @property
    def final_norm(self) -> nn.Module:
        return self._final_norm

    def _norm_eps(self) -> float:
        norm = self._final_norm
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(norm, attr, None), float):
                return getattr(norm, attr)
        raise AttributeError(f"cannot find eps on {type(norm).__name__}")

    def final_norm_scale(self, resid: torch.Tensor) -> torch.Tensor:
        """resid [..., D] (the full residual stream at the final norm) -> scale [..., 1], fp32."""
        x = resid.float()
        if self.spec.norm == "layernorm":
            var = x.var(dim=-1, keepdim=True, unbiased=False)
        else:
            var = x.pow(2).mean(dim=-1, keepdim=True)
        return torch.rsqrt(var + self._norm_eps())

    def final_norm_linear(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [..., D] (any component of the residual), scale [..., 1] -> [..., D], in x's dtype."""
        y = x.float()
        if self.spec.norm == "layernorm":
            y = y - y.mean(dim=-1, keepdim=True)
        weight = _param(self._final_norm, "weight")
        y = y * scale
        return (y * weight.float().to(y.device) if weight is not None else y).to(x.dtype)

    @property
    def final_norm_bias(self) -> torch.Tensor:
        """[D] (zeros for RMSNorm)."""
        return _bias(self._final_norm, self.model.config.hidden_size, self.W_E)

    # --- self-check ---------------------------------------------------------------------------

    def _check_ids(self) -> torch.Tensor:
        vocab = self.model.get_output_embeddings().weight.shape[0]
        device = self.model.get_input_embeddings().weight.device
        return (torch.arange(7, device=device) * 7 + 3).remainder(vocab)[None]  # [1, 7]

    def _self_check_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain HF logits, before the attention wrapper goes in."""
        ids = self._check_ids()
        with torch.no_grad():
            return ids, self.model(input_ids=ids, use_cache=False).logits

    def _self_check(self, ids: torch.Tensor, reference: torch.Tensor) -> None:
        """Hooks on every site, no patches: logits must match plain HF; reached sites are verified."""
        hooked, cache = self.run_with_cache(ids, self.info.sites)
        if self.installed_hook_count() != 0:
            raise ParityError("hooks were left on the model after the self-check run")
        tol = 1e-4 if reference.dtype == torch.float32 else 2e-2
        diff = (hooked.float() - reference.float()).abs().max().item()
        scale = max(reference.float().abs().max().item(), 1.0)
        if not diff <= tol * scale:
            raise ParityError(f"{self.info.name}: logits with tdb hooks differ from plain HF by {diff:.3g} "
                              f"(tolerance {tol * scale:.3g}); refusing to debug a model we would misreport")
        batch, seq = ids.shape
        verified, problems = set(), {}
        for site in self.info.sites:
            want = site_shape(site, self.info, batch, seq)
            got = tuple(cache[site].shape) if site in cache else None
            if got is None:
                problems[site] = "not reached by a forward pass"
            elif got != want:
                problems[site] = f"reached with shape {list(got)}, documented {list(want)}"
            else:
                verified.add(site)
        self.verified_sites = frozenset(verified)
        self.verified_order = tuple(x for x in self.info.sites if x in verified)   # in execution order
        self.unverified = problems
