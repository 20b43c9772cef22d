"""The split forward (`SplitRun`, see the package docstring): one batched forward of the real model in
which each real row's receivers that need an input of their own read it from an aux row. Used with a
zero leaf per receiver (EAP gradients), with one sender's delta (exact path patching) and with a
circuit's inputs (faithfulness). Also: chunking plans into forwards of bounded size, cancellation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tdb_server.errors import Cancelled
from tdb_server.model import ModelAdapter
from tdb_server.model.sites import site_kind, site_layer

from ..inputs import Target
from .topology import Topology, block_input
from .writes import final_site, head_writes, write_sites

MAX_ROWS = {"cpu": 256, "cuda": 2048}   # rows per split forward
_TAKES = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "mlp": "mlp.out"}   # receiver input -> the site it is taken at

# (run, plan index, receiver index, the real row's own input at r's block [T, D]) -> input_r [T, D]
InputFn = Callable[["SplitRun", int, int, torch.Tensor], torch.Tensor]


@dataclass
class RowPlan:
    """One real row: groups of receivers that read an input of their own (each group shares one aux
    row, so its receivers must read the same input at the same block; `input_fn` is called with the
    group's first receiver), and how that input is made."""

    groups: list[list[int]]              # receiver indices (into Topology.receivers)
    input_fn: InputFn
    record: bool = False                 # keep this row's sender writes (faithfulness needs them)

    def rows(self, topo: Topology) -> int:
        """Batch rows this plan takes: the real row and one per group (none for the logits)."""
        return 1 + sum(1 for g in self.groups if topo.receivers[g[0]].input != "logits")


class SplitRun:
    """Site handler of the split forward (see the package docstring). Rows: for each plan, the real row
    then its aux rows, in plan order. The logits receiver needs no aux row: the real row's final
    residual is set directly. `final` holds the real rows' final residuals after the forward.

    Not a `Capture`: it rewrites rows of the batch from other rows (aux -> real) as the forward goes,
    and records sender writes of real rows while later sites still need them (`written`)."""

    def __init__(self, adapter: ModelAdapter, topo: Topology, plans: list[RowPlan]):
        self.adapter, self.topo, self.plans = adapter, topo, plans
        self.real: list[int] = []
        self.inputs: dict[str, list[tuple[int, int, int]]] = {}    # site -> [(plan, receiver, row to set)]
        self.takes: dict[str, list[tuple[int, int, int]]] = {}     # site -> [(plan, receiver, aux row)]
        row = 0
        for i, plan in enumerate(plans):
            self.real.append(row)
            row = self._place(i, plan, row)
        self.batch = row
        self.last = final_site(topo)
        self.writes: dict[int, list[torch.Tensor]] = {i: [] for i, p in enumerate(plans) if p.record}
        record = write_sites(topo.n_layers) if self.writes else set()
        self.sites = frozenset(set(self.inputs) | set(self.takes) | {self.last} | record)
        self.final: torch.Tensor | None = None                # [n_plans, T, D]

    def _place(self, i: int, plan: RowPlan, real: int) -> int:
        """Give plan i's groups their aux rows after its real row; -> the next free row."""
        topo, row = self.topo, real + 1
        for group in plan.groups:
            first = topo.receivers[group[0]]
            site = block_input(topo, first)
            if first.input == "logits":
                self.inputs.setdefault(site, []).append((i, len(topo.receivers) - 1, real))
                continue
            for r in group:
                if block_input(topo, topo.receivers[r]) != site:
                    raise ValueError("a receiver group must read one block input")
                take = _TAKES[topo.receivers[r].input]
                self.takes.setdefault(f"blocks.{first.layer}.{take}", []).append((i, r, row))
            self.inputs.setdefault(site, []).append((i, group[0], row))
            row += 1
        return row

    def on_site(self, site: str, value: torch.Tensor) -> torch.Tensor | None:
        new = value
        if site in self.inputs:   # aux rows (logits: the real row itself) get their receiver's input
            new = value.clone()
            for i, r, dest in self.inputs[site]:
                new[dest] = self.plans[i].input_fn(self, i, r, value[self.real[i]])
        if site in self.takes:    # real rows take the receiver's value from its aux row
            new = value.clone()
            for i, r, a in self.takes[site]:
                rec = self.topo.receivers[r]
                if rec.input == "mlp":
                    new[self.real[i]] = value[a]
                else:
                    new[self.real[i], :, rec.index] = value[a, :, rec.index]   # [T, Dh]
        self._record(site, new)
        if site == self.last:
            self.final = new[self.real]
        return None if new is value else new

    def _record(self, site: str, value: torch.Tensor) -> None:
        """Sender writes of recorded real rows, in Topology.senders order (sites fire in that order)."""
        if not self.writes:
            return
        kind = site_kind(site)
        for i in self.writes:
            if kind == "attn.z":
                self.writes[i].append(head_writes(self.adapter, site_layer(site), value[self.real[i]]))
            elif kind in ("embed", "mlp.out"):
                self.writes[i].append(value[self.real[i]].float()[None])

    def written(self, plan: int) -> torch.Tensor:
        """[S_so_far, T, D]: the sender writes of a recorded real row, up to the current site."""
        return torch.cat(self.writes[plan])


def split_forward(adapter: ModelAdapter, topo: Topology, ids: list[int], plans: list[RowPlan], target: Target,
                  grad: bool = False) -> torch.Tensor:
    """Run the split forward; -> the target of each real row, [n_plans]."""
    run = SplitRun(adapter, topo, plans)
    x = torch.tensor([ids]).expand(run.batch, -1)                           # [B, T]
    logits = adapter.forward(x, handler=run, grad=grad)                      # [B, T, V]
    return target.read(logits[run.real], run.final)


def chunks(topo: Topology, plans: list[RowPlan], device: torch.device) -> Iterator[list[RowPlan]]:
    """Plans grouped so that one split forward has at most MAX_ROWS rows."""
    cap = MAX_ROWS.get(device.type, MAX_ROWS["cpu"])
    chunk, rows = [], 0
    for p in plans:
        need = p.rows(topo)
        if chunk and rows + need > cap:
            yield chunk
            chunk, rows = [], 0
        chunk.append(p)
        rows += need
    if chunk:
        yield chunk


def model_device(adapter: ModelAdapter) -> torch.device:
    return adapter.model.get_input_embeddings().weight.device


def model_dtype(adapter: ModelAdapter) -> torch.dtype:
    return next(adapter.model.parameters()).dtype


def check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("the client cancelled the request")
