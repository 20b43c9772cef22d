"""Progress bars for the long calls -- patching sweeps, circuits, activation records -- when the caller
asks with `progress=True`: tqdm's auto mode (a widget in Jupyter with ipywidgets, text in a terminal).
The bar moves only with the progress the server streams (stage, done, total); nothing is estimated
here. tqdm is the client's `progress` extra, imported only when a bar is asked for.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

# What each call's progress callback receives, read as (stage, done, total).
Reader = Callable[..., "tuple[str, int, int] | None"]


def sweep_stage(partial: Any) -> tuple[str, int, int] | None:
    """A PatchSweepResult as it fills: its latest SweepProgress, if any."""
    p = partial.progress
    return None if p is None else (p.stage, p.done, p.total)


def circuit_stage(p: Any) -> tuple[str, int, int]:
    """A CircuitProgress: the stage (attribution, verify, circuit) and steps done of the total."""
    return p.stage, p.done, p.total


def records_stage(done: int, total: int) -> tuple[str, int, int]:
    """Activation records: corpus windows read of the total."""
    return "windows", done, total


class Bar:
    """One tqdm bar for one call; a new stage relabels it and sets its total."""

    def __init__(self, desc: str):
        try:
            from tqdm.auto import tqdm
        except ImportError as e:
            raise ImportError("progress=True needs tqdm: pip install 'tdb-client[progress]'") from e
        self._tqdm = tqdm
        self.desc = desc
        self.bar: Any = None
        self.stage = ""

    def update(self, stage: str, done: int, total: int) -> None:
        if self.bar is None:
            # no rate: counts jump as the server's messages arrive, so "it/s" would say nothing
            self.bar = self._tqdm(total=total, desc=f"{self.desc}: {stage}", leave=True,
                                  bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
        elif stage != self.stage or total != self.bar.total:
            self.bar.reset(total=total)
            self.bar.set_description(f"{self.desc}: {stage}", refresh=False)
        self.stage = stage
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def reporting(enabled: bool, desc: str, read: Reader,
              then: Callable[..., Any] | None) -> Iterator[Callable[..., Any] | None]:
    """The progress callback for one call: it moves a bar (when `enabled`) and calls `then` (the
    caller's own on_progress, whose return value it passes on); None when there is neither. The bar
    is closed when the call ends, however it ends."""
    bar = Bar(desc) if enabled else None

    def callback(*args: Any) -> Any:
        got = read(*args)
        if bar is not None and got is not None:
            bar.update(*got)
        return then(*args) if then is not None else None

    try:
        yield callback if bar is not None or then is not None else None
    finally:
        if bar is not None:
            bar.close()
