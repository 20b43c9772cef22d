"""The flags of `tdb dap` / `python -m tdb_client.dap` and `tdb dashboard` / `python -m streamlit_app` are
defined once, in tdb_client/cli_options.py, and every entry point takes them from there (the equality of
the parsers themselves is checked in tests/dap/test_dap_module_entry.py and
tests/dashboard/test_dashboard_module_entry.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _subparser(parser, name: str):
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def _flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@pytest.fixture
def marked(monkeypatch):
    """cli_options with a flag only it defines: an entry point that has it took its flags from there."""
    from tdb_client import cli_options

    dap, dashboard = cli_options.add_dap_options, cli_options.add_dashboard_options

    def add_dap(p):
        dap(p)
        p.add_argument("--from-cli-options-dap")

    def add_dashboard(p, **kw):
        dashboard(p, **kw)
        p.add_argument("--from-cli-options-dashboard")

    monkeypatch.setattr(cli_options, "add_dap_options", add_dap)
    monkeypatch.setattr(cli_options, "add_dashboard_options", add_dashboard)


def test_every_entry_point_takes_its_flags_from_the_one_definition(marked):
    from streamlit_app.__main__ import build_parser as dashboard_module
    from tdb_client.dap.__main__ import build_parser as dap_module
    from tdb_server.cli import build_parser as tdb

    assert "--from-cli-options-dap" in _flags(dap_module())
    assert "--from-cli-options-dap" in _flags(_subparser(tdb(), "dap"))
    assert "--from-cli-options-dashboard" in _flags(dashboard_module())
    assert "--from-cli-options-dashboard" in _flags(_subparser(tdb(), "dashboard"))


def test_the_client_only_dashboard_requires_a_server_and_has_no_model():
    from streamlit_app.__main__ import build_parser

    assert "--model" not in _flags(build_parser())
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
    assert build_parser().parse_args(["--server", "h:1"]).server == "h:1"


def test_the_options_module_loads_neither_torch_nor_the_server():
    code = ("import sys, tdb_client.cli_options; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tdb_server', 'streamlit')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
