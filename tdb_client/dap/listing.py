"""The adapter's one source: a virtual document listing the model's sites in execution order, one a
line, with their dims. Stack frames point at the stop's line; line breakpoints and log points go there.

`.tdbsites` is the language the VS Code manifest allows breakpoints in. Lines are numbered the way
the client asked in `initialize` (`linesStartAt1`, DAP's default true).
"""

from __future__ import annotations

import re
from typing import Any

from .. import ModelInfo
from .protocol import DapError

SOURCE_REFERENCE = 1


class SiteListing:
    """The site listing of `info` (None before launch: no sites), numbered from 1 or 0."""

    def __init__(self, info: ModelInfo | None, lines_start_at1: bool = True):
        self.info = info
        self._base = 1 if lines_start_at1 else 0

    @property
    def site_names(self) -> list[str]:
        return self.info.site_names if self.info else []

    def line(self, index0: int) -> int:
        return index0 + self._base

    def index0(self, line: int) -> int:
        return line - self._base

    def source(self) -> dict[str, Any]:
        """The DAP Source of the listing."""
        name = re.sub(r"[^\w.-]+", "_", self.info.name if self.info else "model")
        return {"name": f"{name}.tdbsites", "sourceReference": SOURCE_REFERENCE, "origin": "tdb: the model's sites"}

    def site_line(self, site: str) -> int:
        """The line of `site`, 0 if it is not listed."""
        names = self.site_names
        return self.line(names.index(site)) if site in names else 0

    def site_at(self, line: int) -> str | None:
        """The site on `line`, None if the line is outside the listing."""
        i, names = self.index0(line), self.site_names
        return names[i] if 0 <= i < len(names) else None

    def is_listing(self, source: dict[str, Any]) -> bool:
        """Whether a setBreakpoints source is the listing: its reference, or (once launched) its name."""
        return source.get("sourceReference") == SOURCE_REFERENCE or (
            self.info is not None and source.get("name") == self.source()["name"])

    def locations(self, source: dict[str, Any], line: int, end: int) -> list[dict[str, Any]]:
        """breakpointLocations: every listed line in [line, end] of the listing."""
        if source.get("sourceReference") != SOURCE_REFERENCE or self.info is None:
            return []
        return [{"line": ln} for ln in range(line, end + 1) if self.site_at(ln) is not None]

    def content(self, ref: Any) -> str:
        """The text of source `ref`."""
        if ref != SOURCE_REFERENCE or self.info is None:
            raise DapError(f"no source {ref!r}: the only source is the model's site listing ({SOURCE_REFERENCE})")
        width = max(len(s.name) for s in self.info.sites) + 2
        lines = [f"{s.name:<{width}}[{', '.join(s.dims)}]" + ("" if s.verified else "   (never reached)")
                 for s in self.info.sites]
        return "\n".join(lines) + "\n"
