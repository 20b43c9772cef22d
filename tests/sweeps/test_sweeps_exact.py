"""Batched, resumed patching sweeps equal a serial one-patch-per-forward reference in plain torch.

The reference runs a copy of the HF model with hooks written in this file and an eager attention
function registered here (so q / k / v after RoPE and the pattern can be replaced without tdb code),
one full forward per patch. Every sweep kind, both families (GPT-2; Llama with GQA and RoPE), both
directions, several targets; tolerance 1e-5 in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tdb_server.analyses import TargetSpec, resolve_target
from tdb_server.analyses.sweeps import KINDS, SweepSpec, attribution_patching, patch_sweep
from tdb_server.model import build_random_model
from tdb_server.model.arch import get_path

CLEAN = [3, 14, 15, 92, 65, 35, 89, 79]
CORRUPTED = [3, 14, 15, 92, 11, 35, 27, 79]
A, B = 5, 7
TOL = 1e-5


# --- a plain torch reference: eager attention with patchable q / k / v / pattern ----------------

class RefState:
    """What the reference attention function records (capture) or replaces (patch)."""

    capture: dict | None = None        # (layer, kind) -> [1, ...] in the site layout
    patch: tuple | None = None         # (layer, kind, unit, pos or None, source value [1, ...])


def _repeat(x, n):
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, Dh], key/value [B, Hkv, T, Dh] (after RoPE) -> ([B, T, H, Dh], pattern)."""
    layer = module.layer_idx
    site = {"q": query.transpose(1, 2), "k": key.transpose(1, 2), "v": value.transpose(1, 2)}  # [B, T, H, Dh]
    p = RefState.patch
    if p and p[0] == layer and p[1] in site:
        _, kind, unit, pos, src = p
        new = site[kind].clone()
        if pos is None:
            new[:, :, unit] = src[:, :, unit]
        else:
            new[:, pos, unit] = src[:, pos, unit]
        site[kind] = new
    if RefState.capture is not None:
        for kind, x in site.items():
            RefState.capture[layer, kind] = x.detach().clone()
    q, k, v = (site[x].transpose(1, 2) for x in "qkv")
    h, t = q.shape[1], q.shape[2]
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = q @ _repeat(k, h // k.shape[1]).transpose(-1, -2) * scale        # [B, H, T, T]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    pattern = torch.softmax(scores.masked_fill(~causal, torch.finfo(scores.dtype).min), dim=-1)
    if p and p[0] == layer and p[1] == "pattern":
        _, _, unit, pos, src = p
        pattern = pattern.clone()
        if pos is None:
            pattern[:, unit] = src[:, unit]
        else:
            pattern[:, unit, pos] = src[:, unit, pos]
    if RefState.capture is not None:
        RefState.capture[layer, "pattern"] = pattern.detach().clone()
    out = pattern @ _repeat(v, h // v.shape[1])                                 # [B, H, T, Dh]
    return out.transpose(1, 2).contiguous(), pattern


def reference_model(adapter):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("sweep_test_ref", ref_attention)
    AttentionMaskInterface.register("sweep_test_ref", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = copy.deepcopy(adapter.model)
    model.set_attn_implementation("sweep_test_ref")
    return model


class Reference:
    """Serial patching: one full forward of the reference model per patch, hooks written here."""

    def __init__(self, adapter, target_pos: int, metric):
        self.adapter, self.model, self.pos, self.metric = adapter, reference_model(adapter), target_pos, metric
        spec = adapter.spec
        self.blocks = get_path(self.model, spec.blocks)
        self.modules = {"attn.out": spec.attn, "mlp.out": spec.mlp, "attn.z": spec.attn_out_proj,
                        "mlp.post": spec.mlp_out_proj}
        self.n_heads = adapter.info.n_heads

    def _hooks(self, layer, kind, fn):
        """fn(value in site layout) -> new value; installed on the right module; returns handles."""
        block = self.blocks[layer]
        if kind == "resid_pre":
            def pre(m, args, kwargs):
                if args:
                    return (fn(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
            return [block.register_forward_pre_hook(pre, with_kwargs=True)]
        module = get_path(block, self.modules[kind])
        if kind in ("attn.z", "mlp.post"):
            def pre_in(m, args):
                x = args[0]
                view = x.view(*x.shape[:-1], self.n_heads, -1) if kind == "attn.z" else x
                return (fn(view).reshape(x.shape), *args[1:])
            return [module.register_forward_pre_hook(pre_in)]

        def post(m, args, out):
            if isinstance(out, tuple):
                return (fn(out[0]), *out[1:])
            return fn(out)
        return [module.register_forward_hook(post)]

    def run(self, ids, hooks=()):
        try:
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, self.pos]
            return float(self.metric(logits))
        finally:
            for h in hooks:
                h.remove()

    def capture(self, ids, kind, layers):
        """Site values [1, ...] of a run, per layer."""
        if kind.startswith("attn.") and kind.split(".")[1] in ("q", "k", "v", "pattern"):
            RefState.capture = {}
            self.run(ids)
            got = {layer: RefState.capture[layer, kind.split(".")[1]] for layer in layers}
            RefState.capture = None
            return got
        store, hooks = {}, []
        for layer in layers:
            def keep(x, layer=layer):
                store[layer] = x.detach().clone()
                return x
            hooks += self._hooks(layer, kind, keep)
        self.run(ids, hooks)
        return store

    def patched(self, ids, kind, layer, unit, pos, source, unit_dim, pos_dim):
        """The metric with one patch (unit None = whole site; pos None = every position)."""
        src = source[layer]
        short = kind.split(".")[1] if kind.startswith("attn.") else ""
        if short in ("q", "k", "v", "pattern"):
            RefState.patch = (layer, short, unit, pos, src)
            try:
                return self.run(ids)
            finally:
                RefState.patch = None

        def fn(x):
            x = x.clone()
            idx = [slice(None)] * x.dim()
            if pos is not None:
                idx[pos_dim] = pos
            if unit is not None:
                idx[unit_dim] = unit
            x[tuple(idx)] = src[tuple(idx)]
            return x
        return self.run(ids, self._hooks(layer, kind, fn))


def serial_sweep(ref, base_ids, source_ids, kind_name, layers, positions, per_position):
    """The whole grid, one forward per patch, in the sweep's C-order."""
    k = KINDS[kind_name]
    info = ref.adapter.info
    source = ref.capture(source_ids, k.site, layers)
    n_units = {"head": info.n_heads, "kv_head": info.n_kv_heads, "neuron": info.d_mlp}.get(k.unit, 1)
    out = []
    for layer in layers:
        for unit in range(n_units):
            for pos in (positions if (per_position or k.unit is None) else [None]):
                out.append(ref.patched(base_ids, k.site, layer, unit if k.unit else None, pos, source,
                                       k.unit_dim, k.pos_dim))
    return torch.tensor(out)


# --- the cases ------------------------------------------------------------------------------------

CASES = [  # (kind, per_position, direction, extra spec)
    ("resid_pre", False, "denoising", {}),
    ("attn_out", False, "noising", {}),
    ("mlp_out", False, "denoising", {"positions": (0, 4, 7)}),
    ("head_out", False, "denoising", {}),
    ("head_out", True, "noising", {}),
    ("head_q", False, "noising", {}),
    ("head_q", True, "denoising", {"layers": (1,)}),
    ("head_k", False, "denoising", {}),
    ("head_k", True, "noising", {"positions": (1, 4, 6)}),
    ("head_v", False, "denoising", {}),
    ("head_v", True, "denoising", {"layers": (0,)}),
    ("head_pattern", False, "denoising", {}),
    ("head_pattern", True, "noising", {}),
    ("neuron", False, "denoising", {}),
    ("neuron", True, "noising", {"layers": (1,), "positions": (4, 7)}),
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request):
    adapter = build_random_model(request.param, seed=1, initializer_range=0.2)
    target, _ = resolve_target(adapter, TargetSpec(token_ids=(A,), distractor_ids=(B,)), CLEAN)
    ref = Reference(adapter, target.position, lambda logits: logits[A] - logits[B])
    yield adapter, target, ref
    assert adapter.installed_hook_count() == 0


def _ids(direction):
    return (CORRUPTED, CLEAN) if direction == "denoising" else (CLEAN, CORRUPTED)


@pytest.mark.parametrize("kind,per_position,direction,extra", CASES,
                         ids=[f"{c[0]}-{'pos' if c[1] else 'all'}-{c[2]}" for c in CASES])
def test_batched_sweep_equals_serial_reference(family, kind, per_position, direction, extra):
    adapter, target, ref = family
    spec = SweepSpec(kind, direction=direction, per_position=per_position, max_batch=7, **extra)
    got = patch_sweep(adapter, CLEAN, CORRUPTED, target, spec)
    layers = list(extra.get("layers", range(adapter.info.n_layers)))
    positions = list(extra.get("positions", range(len(CLEAN))))
    base_ids, source_ids = _ids(direction)
    want = serial_sweep(ref, base_ids, source_ids, kind, layers, positions, per_position)
    assert got.values.shape == got.normalized.shape
    assert got.values.numel() == want.numel()
    assert not torch.isnan(got.values).any()
    diff = (got.values.flatten() - want).abs().max().item()
    assert diff <= TOL, f"{kind}: batched vs serial differ by {diff:.3g}"
    assert (want - (got.corrupted_value if direction == "denoising" else got.clean_value)).abs().max() > 1e-3, \
        "the sweep moved nothing: the test would not see a wrong patch"
    clean, corrupted = ref.run(CLEAN), ref.run(CORRUPTED)
    assert abs(got.clean_value - clean) <= TOL and abs(got.corrupted_value - corrupted) <= TOL
    norm = (want - corrupted) / (clean - corrupted)
    assert (got.normalized.flatten() - norm).abs().max().item() <= 1e-4


def test_other_targets_and_an_earlier_target_position(family):
    """logprob, and a target read at position 5 (the prompts are cut after it)."""
    adapter, _, _ = family
    target, _ = resolve_target(adapter, TargetSpec(kind="logprob", token_ids=(A,), position=5), CLEAN)
    ref = Reference(adapter, 5, lambda logits: torch.log_softmax(logits, -1)[A])
    got = patch_sweep(adapter, CLEAN, CORRUPTED, target, SweepSpec("head_out", per_position=True))
    assert got.values.shape == (adapter.info.n_layers, adapter.info.n_heads, 6)     # positions 0..5
    want = serial_sweep(ref, CORRUPTED, CLEAN, "head_out", [0, 1], list(range(6)), True)
    assert (got.values.flatten() - want).abs().max().item() <= TOL


def test_direction_target(family):
    """final residual . direction, read at the last position."""
    adapter, _, _ = family
    d = torch.randn(adapter.info.d_model, generator=torch.Generator().manual_seed(0))
    target, _ = resolve_target(adapter, TargetSpec(kind="direction", direction=d), CLEAN)
    ref, final = Reference(adapter, len(CLEAN) - 1, None), {}
    hook = ref.blocks[-1].register_forward_hook(
        lambda m, a, o: final.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    ref.metric = lambda logits: final["x"][0, -1] @ d
    try:
        want = serial_sweep(ref, CORRUPTED, CLEAN, "resid_pre", [0, 1], list(range(len(CLEAN))), False)
    finally:
        hook.remove()
    got = patch_sweep(adapter, CLEAN, CORRUPTED, target, SweepSpec("resid_pre"))
    assert (got.values.flatten() - want).abs().max().item() <= TOL


def test_attribution_estimates_match_autograd_and_verification_is_exact(family):
    """Estimates = (source - base) . grad from plain autograd on the reference model; verified
    values equal the exhaustive exact sweep at those cells; correlations are reported."""
    adapter, target, ref = family
    exact = patch_sweep(adapter, CLEAN, CORRUPTED, target, SweepSpec("head_out"))
    atp = attribution_patching(adapter, CLEAN, CORRUPTED, target, SweepSpec("head_out", verify_top_k=5))
    verified = ~torch.isnan(atp.values)
    assert int(verified.sum()) == 5 and atp.summary.verified == 5
    assert (atp.values[verified] - exact.values[verified]).abs().max() <= TOL
    assert -1.0 <= atp.summary.spearman <= 1.0 and -1.0 <= atp.summary.pearson <= 1.0
    # plain autograd: z of every layer on the corrupted run, d metric / d z
    source = ref.capture(CLEAN, "attn.z", [0, 1])
    zs, hooks = {}, []
    for layer in range(2):
        proj = get_path(ref.blocks[layer], adapter.spec.attn_out_proj)

        def pre(m, args, layer=layer):
            x = args[0].detach().requires_grad_(True) if layer == 0 else args[0]
            x.retain_grad()
            zs[layer] = x
            return (x,)
        hooks.append(proj.register_forward_pre_hook(pre))
    try:
        logits = ref.model(input_ids=torch.tensor([CORRUPTED]), use_cache=False).logits[0, -1]
        (logits[A] - logits[B]).backward()
    finally:
        for h in hooks:
            h.remove()
    H = adapter.info.n_heads
    est = torch.stack([((source[layer] - zs[layer].detach().view(1, len(CLEAN), H, -1))
                        * zs[layer].grad.view(1, len(CLEAN), H, -1)).sum((0, 1, 3)) for layer in range(2)])
    assert (atp.approx_values - (exact.corrupted_value + est)).abs().max() <= 1e-4
