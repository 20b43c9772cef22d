"""SAE latents as node-table rows (see analyses/node_table.py for the other node types).

The SAE is spliced with its reconstruction error kept, so latent k's part of the site at position t
is w[t, k] = a[t, k] * s[t] * W_dec[k] (s: the SAE's per-position output scale, 1 without
normalization). Its metrics, with g[t] = d objective / d site[t] and G[t] the direct-effect
direction in the residual stream:

| column        | latent k at position t                                                 |
|---------------|------------------------------------------------------------------------|
| activation    | a[t, k]                                                                |
| write_norm    | |w[t, k] M|: M maps the site to the residual stream (identity for resid, attn.out, mlp.out; W_out for mlp.post; W_O for attn.z; 0 for mlp.pre) |
| direct_effect | w[t, k] M . G[t]                                                       |
| total_effect  | w[t, k] . g[t]  (activation x gradient through the splice)             |

Latent rows overlap the other rows (they decompose a site that heads and neurons also write), so
they are left out of the node table's direct-effect sum. Rows carry key_pos = the site's code
(its index in `model.sites.BLOCK_KINDS`), so that two SAEs of one layer stay apart.
"""

from __future__ import annotations

from typing import Any

import torch

from tdb_server.model.sites import BLOCK_KINDS, parse_site

from .attach import attached


def site_code(site: str, n_layers: int) -> int:
    return BLOCK_KINDS.index(parse_site(site, n_layers).kind)


def site_of_code(layer: int, code: int) -> str:
    return f"blocks.{layer}.{BLOCK_KINDS[code]}"


def to_residual(adapter: Any, site: str) -> torch.Tensor | None:
    """M [d_in, D]: how a vector in the site's space is written to the residual stream (None = identity)."""
    s = parse_site(site, adapter.info.n_layers)
    if s.kind == "mlp.post":
        return adapter.W_out(s.layer).float()                                        # [N, D]
    if s.kind == "attn.z":
        return adapter.W_O(s.layer).float().flatten(0, 1)                            # [H*Dh, D]
    if s.kind == "mlp.pre":
        return torch.zeros(adapter.info.d_mlp, adapter.info.d_model)
    return None


def sites(adapter: Any) -> set[str]:
    return set(attached(adapter))


def latent_parts(adapter: Any, cap: Any, G: torch.Tensor) -> list[tuple]:
    """Per attached SAE: (layer, index [1, K], qpos [T, 1], code, act, write, direct, total), each [T, K].
    `cap` is the node table's GradCapture (the SAE sites among its grad sites); G [T, D]."""
    out = []
    for site, entry in sorted(attached(adapter).items()):
        sae = entry.sae
        if site not in cap.values:
            continue
        value = cap.values[site][:1].detach()                                       # [1, T, ...]
        x = sae.flat(value)[0]                                                       # [T, d_in]
        g = sae.flat(cap.grad(site)[None])[0].to(x.device)                           # [T, d_in]
        a = sae.encode(value)[0]                                                     # [T, K]
        _, scale, _ = sae._in(x)                                                     # [T, 1]
        dirs = torch.stack([sae.write_direction(k) for k in range(sae.d_sae)]) if (
            sae.cfg.architecture == "topk" and sae.cfg.rescale_acts_by_decoder_norm) else sae.W_dec   # [K, d_in]
        M = to_residual(adapter, site)
        resid_dirs = dirs if M is None else dirs @ M.to(dirs.device)                 # [K, D]
        coef = a * scale                                                             # [T, K]
        write = coef.abs() * resid_dirs.norm(dim=-1)[None]                           # [T, K]
        direct = coef * (G.to(x.device) @ resid_dirs.T)                              # [T, K]
        total = coef * (g @ dirs.T)                                                  # [T, K]
        T, K = a.shape
        layer = parse_site(site, adapter.info.n_layers).layer
        out.append((layer, torch.arange(K)[None, :], torch.arange(T)[:, None],
                    torch.full((), site_code(site, adapter.info.n_layers)), a, write, direct, total))
    return out
