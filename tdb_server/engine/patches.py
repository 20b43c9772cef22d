"""Session patches: the engine's bookkeeping around the one intervention model.

A `Patch` is what one Patch call asked for: the name the client gave (a site, a unit, a layer node
such as `blocks.1.attn`, or a pattern such as `blocks.*.attn.head.*`), the `Intervention`s it stands
for (model/interventions.py says what each op and selector means and how edits at one site compose),
where it lives (the session: every launch; or the live run) and at which generation steps it applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.interventions import Intervention
from ..model.sites import site_layer


@dataclass
class Patch:
    id: int
    name: str                                # what the client named
    interventions: list[Intervention]        # what it stands for (one per unit or site)
    tokens: tuple[int, ...] = ()             # generation steps where it applies (empty = every step)
    scope: str = "run"                       # "session" | "run"
    applied: bool = False                    # its sites ran since it was registered (this run)

    @property
    def sites(self) -> set[str]:
        """Where its interventions land."""
        return {iv.site for iv in self.interventions}

    @property
    def hooks(self) -> set[str]:
        """The sites a run must hook for it: where it lands, and attn.z for a head landing on attn.out."""
        heads = {f"blocks.{site_layer(iv.site)}.attn.z" for iv in self.interventions
                 if iv.unit is not None and iv.unit.kind == "head" and iv.site.endswith(".attn.out")}
        return self.sites | heads

    def at(self, site: str, token: int) -> list[Intervention]:
        """Its interventions landing on `site` in generation step `token`."""
        if self.tokens and token not in self.tokens:
            return []
        return [iv for iv in self.interventions if iv.site == site]

    def describe(self) -> str:
        first = self.interventions[0]
        return first.describe(name=self.name)
