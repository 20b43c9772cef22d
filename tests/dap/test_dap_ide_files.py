"""The VS Code manifest, the example launch.json, the docs and ide/nvim-dap.md agree with what the adapter
takes; the Lua of ide/nvim-dap.md parses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VSCODE = ROOT / "ide" / "vscode"
GENERIC = {"type", "request", "name", "debugServer", "noDebug"}


def _debugger() -> dict:
    [dbg] = json.loads((VSCODE / "package.json").read_text())["contributes"]["debuggers"]
    return dbg


def _check_config(cfg: dict, props: dict) -> None:
    assert cfg["type"] == "tdb" and cfg["request"] == "launch" and cfg["name"]
    assert ("prompt" in cfg) != ("tokens" in cfg), cfg
    assert set(cfg) - GENERIC <= set(props), set(cfg) - GENERIC - set(props)


def test_manifest_declares_the_tdb_debugger():
    manifest = json.loads((VSCODE / "package.json").read_text())
    dbg = _debugger()
    assert dbg["type"] == "tdb" and "Debuggers" in manifest["categories"]
    program = VSCODE / dbg["program"]
    assert program.is_file() and os.access(program, os.X_OK)
    assert "dap" in program.read_text()
    assert (VSCODE / dbg["windows"]["program"]).is_file()
    props = dbg["configurationAttributes"]["launch"]["properties"]
    assert {"prompt", "tokens", "server", "token", "adapterToken", "model", "device", "dtype", "stopOnEntry",
            "prependBos", "capture", "breakpoints", "generate"} <= set(props)
    for cfg in dbg["initialConfigurations"] + [s["body"] for s in dbg["configurationSnippets"]]:
        _check_config(cfg, props)
    assert {"language": "tdb-sites"} in manifest["contributes"]["breakpoints"]
    assert any(".tdbsites" in lang["extensions"] for lang in manifest["contributes"]["languages"])


def test_example_launch_json():
    props = _debugger()["configurationAttributes"]["launch"]["properties"]
    configs = json.loads((VSCODE / "launch.json").read_text())["configurations"]
    assert configs
    for cfg in configs:
        _check_config(cfg, props)


def test_docs_cover_every_launch_attribute():
    doc = (ROOT / "docs" / "ide.md").read_text()
    for prop in _debugger()["configurationAttributes"]["launch"]["properties"]:
        assert re.search(rf"`{prop}`", doc), f"docs/ide.md does not describe {prop!r}"
    assert (ROOT / "ide" / "nvim-dap.md").is_file()


def _lua_blocks() -> list[str]:
    return re.findall(r"```lua\n(.*?)```", (ROOT / "ide" / "nvim-dap.md").read_text(), re.DOTALL)


def test_nvim_dap_doc_lua_is_valid_syntax(tmp_path):
    """Every ```lua block of ide/nvim-dap.md parses (luac -p: syntax only; `vim` and `dap` are Neovim's)."""
    luac = shutil.which("luac5.4") or shutil.which("luac")
    if luac is None:
        pytest.skip("no luac (scripts/install_dap_client.sh installs Debian's lua5.4 where apt-get is at hand)")
    blocks = _lua_blocks()
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        f = tmp_path / f"block{i}.lua"
        f.write_text(block)
        done = subprocess.run([luac, "-p", str(f)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"ide/nvim-dap.md lua block {i + 1}: {done.stderr}"


def test_nvim_dap_doc_names_versions_and_the_hover_mapping():
    doc = (ROOT / "ide" / "nvim-dap.md").read_text()
    assert "0.7" in doc and "Debian 12" in doc
    assert 'hover("<cWORD>")' in "".join(_lua_blocks())
    configs = "".join(_lua_blocks())
    assert "generate = { maxNewTokens" in configs


def test_debug_server_is_said_to_be_vscode_only():
    configs = json.loads((VSCODE / "launch.json").read_text())["configurations"]
    [listening] = [c for c in configs if "debugServer" in c]
    assert "VS Code only" in listening["name"]
    assert "nvim-dap ignores it" in (ROOT / "docs" / "ide.md").read_text()


def test_docs_and_manifest_no_longer_refuse_generation():
    doc = (ROOT / "docs" / "ide.md").read_text()
    manifest = (VSCODE / "package.json").read_text()
    for text in (doc, manifest):
        assert "no generation" not in text and "not supported" not in text
    assert "TDB_COMMAND" in doc and "not on the PATH" in doc
