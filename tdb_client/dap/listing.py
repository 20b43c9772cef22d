"""The adapter's one source: a virtual document listing the model's sites in execution order, one a
line, with their dims. Stack frames point at the stop's line; line breakpoints and log points go there.

Its DAP Source has both a `sourceReference` (the adapter serves the text) and a `path`,
`<model>.tdbsites`: VS Code allows breakpoints in the `.tdbsites` language its manifest declares, and
nvim-dap names the buffer after the path (so the filetype applies) and sends breakpoints set there as
`{path: ".../<model>.tdbsites"}` with no reference. A source is the listing when it carries the
reference or its file name is the listing's; another model's listing is told apart by its name. Lines are
numbered the way the client asked in `initialize` (`linesStartAt1`, DAP's default true).
"""

from __future__ import annotations

import ntpath
import posixpath
import re
from typing import Any

from .. import ModelInfo
from .protocol import DapError

SOURCE_REFERENCE = 1
SUFFIX = ".tdbsites"


def file_name(source: dict[str, Any]) -> str:
    """The file name of a DAP Source's path (either separator), else its name; "" if it has neither."""
    path = source.get("path")
    if isinstance(path, str) and path:
        return ntpath.basename(posixpath.basename(path))
    name = source.get("name")
    return name if isinstance(name, str) else ""


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

    @property
    def name(self) -> str:
        """`<model>.tdbsites`, the listing's file name."""
        return re.sub(r"[^\w.-]+", "_", self.info.name if self.info else "model") + SUFFIX

    def source(self) -> dict[str, Any]:
        """The DAP Source of the listing."""
        return {"name": self.name, "path": self.name, "sourceReference": SOURCE_REFERENCE,
                "origin": "tdb: the model's sites"}

    def site_line(self, site: str) -> int:
        """The line of `site`, 0 if it is not listed."""
        names = self.site_names
        return self.line(names.index(site)) if site in names else 0

    def site_at(self, line: int) -> str | None:
        """The site on `line`, None if the line is outside the listing."""
        i, names = self.index0(line), self.site_names
        return names[i] if 0 <= i < len(names) else None

    def is_listing(self, source: dict[str, Any]) -> bool:
        """Whether a source is this listing: its reference, or (once launched) its file name."""
        if self.info is None:
            return False
        return source.get("sourceReference") == SOURCE_REFERENCE or file_name(source) == self.name

    def refusal(self, source: dict[str, Any]) -> str:
        """Why breakpoints in `source` (not this listing) cannot be set: the message each one carries."""
        name = file_name(source)
        if self.info is None:
            return "the model's site listing exists once the debug session is launched"
        if name.endswith(SUFFIX):
            return (f"{name} is the site listing of another model; this session runs {self.info.name}, "
                    f"whose sites are listed in {self.name}")
        return f"tdb breakpoints go in the model's site listing ({self.name}) or are function breakpoints"

    def locations(self, source: dict[str, Any], line: int, end: int) -> list[dict[str, Any]]:
        """breakpointLocations: every listed line in [line, end] of the listing."""
        if not self.is_listing(source):
            return []
        return [{"line": ln} for ln in range(line, end + 1) if self.site_at(ln) is not None]

    def content(self, source: dict[str, Any]) -> str:
        """The text of a source (by reference, or by the listing's file name)."""
        if self.info is None:
            raise DapError("no source yet: the model's site listing exists once the debug session is launched")
        if not self.is_listing(source):
            ref = source.get("sourceReference")
            what = f"sourceReference {ref!r}" if ref else f"{file_name(source)!r}" if file_name(source) else \
                "a source with neither a sourceReference nor a path"
            raise DapError(f"no source {what}: tdb's only source is the model's site listing, {self.name} "
                           f"(sourceReference {SOURCE_REFERENCE})")
        width = max(len(s.name) for s in self.info.sites) + 2
        lines = [f"{s.name:<{width}}[{', '.join(s.dims)}]" + ("" if s.verified else "   (never reached)")
                 for s in self.info.sites]
        return "\n".join(lines) + "\n"
