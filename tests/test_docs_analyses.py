"""docs/analyses.md's code blocks run as written (the example analysis is unregistered afterwards, so the
servers of other tests do not advertise it)."""

from doc_helpers import python_blocks

from tdb_server.analyses.registry import REGISTRY


def test_how_to_add_an_analysis_runs(capsys):
    blocks = python_blocks("docs/analyses.md")
    assert len(blocks) == 3
    env: dict = {}
    try:
        for code in blocks:
            exec(compile(code, "analyses.md", "exec"), env)
    finally:
        REGISTRY.pop("block_writes", None)
    assert capsys.readouterr().out.split() == ["True"] * 4
