"""One capture: the site handler that keeps what a forward computed, as TransformerLens's
`run_with_cache` / `ActivationCache` do, for every analysis that only needs to read sites.

    logits, cache = adapter.run_with_cache(ids, {"blocks.1.attn.z", "blocks.1.resid_post"})
    cache["blocks.1.attn.z"]                      # [B, T, H, Dh], detached

A `Capture` may also
- apply an edit before it keeps a value (`edit(site, value) -> new value | None`: the interventions of
  `model/interventions.py`), so that an analysis reads the patched forward;
- keep the autograd graph for `grad_sites` (a forward with gradients, for attribution): the
  embedding becomes a leaf that requires grad, every grad site is replaced by a view whose `.grad`
  is retained, and the other sites are kept as they are (still in the graph).

The engine's debug runs (breakpoints, stepping) have their own handler, `engine/run.py`'s `DebugRun`;
everything else that runs the model goes through this one.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

Edit = Callable[[str, torch.Tensor], "torch.Tensor | None"]


class Capture:
    """A site handler that records `sites` (and `grad_sites`) of one forward.

    `values[site]` is the site's value as the forward continued with it (after `edit`): detached,
    unless the site is a grad site or the capture keeps the graph."""

    def __init__(self, sites: Iterable[str] = (), *, grad_sites: Iterable[str] = (), edit: Edit | None = None,
                 edit_sites: Iterable[str] = (), keep_graph: bool = False):
        self.grad_sites = frozenset(grad_sites) | ({"embed"} if grad_sites else frozenset())
        self.keep_graph = keep_graph or bool(self.grad_sites)
        self._keep = frozenset(sites) | self.grad_sites
        self.edit = edit
        self.sites = self._keep | frozenset(edit_sites)   # what the adapter hooks
        self.values: dict[str, torch.Tensor] = {}

    def on_site(self, site: str, value: torch.Tensor) -> torch.Tensor | None:
        new = self.edit(site, value) if self.edit is not None else None
        out = value if new is None else new
        if site in self.grad_sites:
            # a fresh leaf for the embedding; elsewhere a view (no copy) that is its own tensor in the graph,
            # so that its `.grad` is this site's alone
            out = out.detach().clone().requires_grad_(True) if site == "embed" else out.view_as(out)
            if out.requires_grad and site != "embed":
                out.retain_grad()
            new = out
        if site in self._keep:
            self.values[site] = out if self.keep_graph else out.detach()
        return new

    # -- reading, as a mapping ---------------------------------------------------------------------

    def __getitem__(self, site: str) -> torch.Tensor:
        return self.values[site]

    def __contains__(self, site: object) -> bool:
        return site in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def get(self, site: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.values.get(site, default)

    def grad(self, site: str) -> torch.Tensor | None:
        """The gradient reaching a grad site after `backward()` (None where none flowed)."""
        return self.values[site].grad
