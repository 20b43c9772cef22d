"""docs/architectures.md's code blocks run as written."""

from doc_helpers import python_blocks


def test_architecture_guide_code_runs(capsys):
    blocks = python_blocks("docs/architectures.md")
    assert len(blocks) == 2
    env: dict = {}
    for code in blocks:
        exec(compile(code, "architectures.md", "exec"), env)
    assert "mistral 2 layers, 27 sites verified" in capsys.readouterr().out
