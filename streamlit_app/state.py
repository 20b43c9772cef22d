"""View state in the URL query string, so every view is a shareable link.

A widget bound to the URL takes its first value from the query string (`?prompt=...&layer=1`) and
writes every change back to it. Keys are shared across pages on purpose: the prompt typed on Explore
is the prompt of the Attention and Logit lens pages too (as in OpenAI's Transformer Debugger).

    prompt = url_text_input("Prompt", "prompt")
    layer = url_selectbox("Layer", "layer", options=range(n_layers))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import streamlit as st

# Query-string keys used across the app (one place, so links stay stable).
PAGE, SERVER, PROMPT, PROMPT2, TARGET, DISTRACTOR, MODE = "page", "server", "prompt", "prompt2", "target", "distractor", "mode"
LAYER, HEAD, POS, COMPONENT, BREAKPOINTS, ABLATIONS, TOPK = "layer", "head", "pos", "component", "bp", "ablate", "k"


def url_get(key: str, default: str = "") -> str:
    """The query-string value of `key` (or `default`)."""
    return st.query_params.get(key, default)


def url_set(**values: Any) -> None:
    """Write values to the query string; empty values (None, "", []) remove the key."""
    for key, value in values.items():
        if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
            if key in st.query_params:
                del st.query_params[key]
        else:
            text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            if st.query_params.get(key) != text:
                st.query_params[key] = text


def _widget_key(key: str) -> str:
    return f"url.{key}"


def _seed(key: str, default: Any, parse: Callable[[str], Any]) -> str:
    """Give the widget its first value from the URL (only when Streamlit does not hold one yet)."""
    wkey = _widget_key(key)
    if wkey not in st.session_state:
        raw = url_get(key)
        try:
            st.session_state[wkey] = parse(raw) if raw != "" else default
        except (ValueError, TypeError):
            st.session_state[wkey] = default
    return wkey


def held_value(key: str, parse: Callable[[str], Any] = str) -> Any:
    """The value a URL-bound widget will start this run with: the one it holds, else the URL's (parsed);
    None when neither has one (or the URL's does not parse)."""
    wkey = _widget_key(key)
    if wkey in st.session_state:
        return st.session_state[wkey]
    raw = url_get(key)
    try:
        return parse(raw) if raw != "" else None
    except (ValueError, TypeError):
        return None


def set_value(key: str, value: Any) -> None:
    """Change a URL-bound widget's value from code (call before the widget is drawn, e.g. in a callback)."""
    st.session_state[_widget_key(key)] = value
    url_set(**{key: value})


def goto(page: str, **params: Any) -> None:
    """Switch page (and set some URL values): use as a button's `on_click`, which runs before the page."""
    for key, value in {PAGE: page, **params}.items():
        set_value(key, value)


def url_text_input(label: str, key: str, default: str = "", *, area: bool = False, **kw: Any) -> str:
    wkey = _seed(key, default, str)
    value = (st.text_area if area else st.text_input)(label, key=wkey, **kw)
    url_set(**{key: value if value != default else None})
    return value


def url_number_input(label: str, key: str, default: int, **kw: Any) -> int:
    wkey = _seed(key, default, int)
    value = st.number_input(label, key=wkey, step=1, **kw)
    url_set(**{key: int(value) if value != default else None})
    return int(value)


def url_selectbox(label: str, key: str, options: Sequence[Any], default: Any = None, *,
                  parse: Callable[[str], Any] = str, widget: Callable[..., Any] | None = None, **kw: Any) -> Any:
    """A selectbox (or radio / segmented control via `widget`) whose choice lives in the URL."""
    options = list(options)
    if default is None and options:
        default = options[0]
    wkey = _seed(key, default, parse)
    if st.session_state[wkey] not in options:
        st.session_state[wkey] = default
    value = (widget or st.selectbox)(label, options, key=wkey, **kw)
    url_set(**{key: value if value != default else None})
    return value


def url_multiselect(label: str, key: str, options: Sequence[str], default: Sequence[str] = (), **kw: Any) -> list[str]:
    def parse(raw: str) -> list[str]:
        return [v for v in raw.split(",") if v in options]

    wkey = _seed(key, list(default), parse)
    value = st.multiselect(label, list(options), key=wkey, **kw)
    url_set(**{key: value if list(value) != list(default) else None})
    return list(value)


def url_unlisted(key: str, options: Sequence[str]) -> list[str]:
    """The values of `?key=` that a multiselect over `options` bound to `key` would drop (it holds only
    its options), read before that widget is first drawn; afterwards, []."""
    if _widget_key(key) in st.session_state:
        return []
    return [v for v in url_list(key) if v not in options]


def url_list(key: str) -> list[str]:
    raw = url_get(key)
    return [v for v in raw.split(",") if v] if raw else []
