"""The Debugger's tensor view labels position axes with the tokens at those positions. In generation,
a step's forward (KV cache) holds only the newest positions: the step-1 forward of a 3-token prompt runs
position 3 alone, and its queries were labelled "0 a" (the prompt's first token) instead of "3"."""

from __future__ import annotations

from dash_helpers import charts


def _rows(script_args: dict) -> list[str]:
    from streamlit.testing.v1 import AppTest

    def page(shape, n_positions):
        import numpy as np

        from streamlit_app.widgets import tensor_view

        more = {} if n_positions is None else {"n_positions": n_positions}
        tensor_view(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), ["batch", "pos", "d_model"],
                    key="t", tokens=["a", "b", "c"], **more)

    at = AppTest.from_function(page, kwargs=script_args, default_timeout=30).run()
    assert not at.exception, [e.value for e in at.exception]
    [spec] = charts(at)
    return list(dict.fromkeys(spec["frames"][0]["row"]))


def test_the_prompts_forward_keeps_its_token_labels():
    assert _rows({"shape": (1, 3, 4), "n_positions": None}) == ["0 a", "1 b", "2 c"]
    assert _rows({"shape": (1, 3, 4), "n_positions": 3}) == ["0 a", "1 b", "2 c"]


def test_a_shorter_position_axis_holds_the_newest_positions_not_the_first():
    assert _rows({"shape": (1, 1, 4), "n_positions": None}) == ["2 c"]      # was "0 a"


def test_a_generation_steps_positions_are_the_newest_ones():
    assert _rows({"shape": (1, 1, 4), "n_positions": 4}) == ["3"]          # step 1: the first generated token
    assert _rows({"shape": (1, 2, 4), "n_positions": 3}) == ["1 b", "2 c"]  # the last two of the prompt
    assert _rows({"shape": (1, 5, 4), "n_positions": 5}) == ["0 a", "1 b", "2 c", "3", "4"]   # keys, with the cache
