"""One module per dashboard page; each has `TITLE`, `ICON` and `render(ctx)`.

The order here is the order of the sidebar. A page is picked by `?page=<key>` in the URL."""

from __future__ import annotations

from types import ModuleType

from . import attention, circuit, component, debugger, explore, logit_lens, patching

PAGES: dict[str, ModuleType] = {
    "explore": explore,
    "component": component,
    "debugger": debugger,
    "patching": patching,
    "attention": attention,
    "logit_lens": logit_lens,
    "circuit": circuit,
}
