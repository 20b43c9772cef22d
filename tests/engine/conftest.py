"""Fixtures of the engine's tests: a session of its own on the tiny GPT-2, checked to leave no hook behind."""

from __future__ import annotations

import pytest

from tdb_server.engine.manager import SessionManager


@pytest.fixture
def session(gpt2_adapter):
    mgr = SessionManager(gpt2_adapter)
    yield mgr.create()
    mgr.shutdown()
    assert gpt2_adapter.installed_hook_count() == 0
