"""EdgeScores: the EAP score of every edge with the two runs it came from (clean writes, ablated
writes, target values): what path patching, circuit extraction and the graph all read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdb_server.errors import InvalidArgument

from ..inputs import Target
from .topology import Topology
from .writes import PromptRun

ABLATIONS = ("corrupted", "mean")


@dataclass
class EdgeScores:
    topology: Topology
    scores: torch.Tensor          # [S, R] float32: eap(s -> r); 0 where s cannot reach r
    target: Target
    clean_value: float
    ablated_value: float          # the target with every edge ablated (corrupted: the corrupted prompt)
    clean: PromptRun
    ablated_writes: torch.Tensor  # [S, T, D]
    ablation: str
    ids: list[int]
    corrupted_ids: list[int]
    elapsed_s: float = 0.0

    def edges(self) -> list[tuple[int, int]]:
        """Every reachable edge (s, r), largest |score| first."""
        s_idx, r_idx = torch.nonzero(self.topology.reach, as_tuple=True)
        order = torch.argsort(self.scores[s_idx, r_idx].abs(), descending=True, stable=True)
        return [(int(s_idx[k]), int(r_idx[k])) for k in order]

    def edge_name(self, edge: tuple[int, int]) -> tuple[str, str, str]:
        """(sender, receiver node, input)."""
        s, r = self.topology.senders[edge[0]], self.topology.receivers[edge[1]]
        return s.name, r.node, r.input


def check_pair(ids: list[int], corrupted: list[int] | None, ablation: str) -> None:
    """INVALID_ARGUMENT unless `ablation` is known and a corrupted prompt, if needed, matches `ids` in length."""
    if ablation not in ABLATIONS:
        raise InvalidArgument(f"unknown ablation {ablation!r}; one of {', '.join(ABLATIONS)}", reason="BAD_ABLATION")
    if ablation == "corrupted":
        if not corrupted:
            raise InvalidArgument("corrupted ablation needs a corrupted prompt", reason="BAD_INPUT")
        if len(corrupted) != len(ids):
            raise InvalidArgument(f"the corrupted prompt has {len(corrupted)} tokens, the clean one {len(ids)}: "
                                  "they must have the same length", reason="LENGTH_MISMATCH")
