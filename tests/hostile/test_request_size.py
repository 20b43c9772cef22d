"""A request larger than --max-request-mib is refused before protobuf parses it (parsing a 240 MiB prompt
took the server's peak memory from 383 to 1,429 MiB: benchmarks/bench_big_inputs.py); Patch and
ReplayRecording, which carry tensors and recordings, keep the message limit and their own checks."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tdb_client import Breakpoint, Target, TdbClient, TdbError
from tdb_server.limits import Limits

TWO_MIB = "Mr Darcy " * ((2 << 20) // 9)


@pytest.fixture
def small(make_server, bundled_adapter):
    _, addr = make_server(bundled_adapter, limits=Limits(max_request_bytes=1 << 20))
    with TdbClient(addr, timeout=60) as c:
        yield c


@pytest.mark.parametrize("call", [
    lambda c: c.tokenize(TWO_MIB),
    lambda c: c.node_table(TWO_MIB, Target(["Darcy"], ["Bingley"])),
    lambda c: c.session().launch(TWO_MIB),
    lambda c: c.session().set_breakpoints([Breakpoint("blocks.0.attn.out", log_message=TWO_MIB)]),
], ids=["Tokenize", "NodeTable", "Launch", "SetBreakpoints"])
def test_a_request_over_the_bound_is_resource_exhausted_naming_the_flag(small, call):
    with pytest.raises(TdbError) as e:
        call(small)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "REQUEST_TOO_LARGE"
    assert "--max-request-mib" in e.value.message and "2.0 MiB" in e.value.message
    assert small.tokenize("Mr Darcy")[0]            # the server answers on


def test_patch_values_keep_the_message_limit_and_their_own_checks(small):
    with small.session() as s:
        s.set_breakpoints([Breakpoint("blocks.0.attn.out")])
        s.launch("Mr Darcy")
        with pytest.raises(TdbError) as e:           # 2 MiB of values passes the request bound...
            s.patch("blocks.0.attn.out", "set", value=np.zeros((2 << 20) // 4, dtype=np.float32))
        assert e.value.reason == "BAD_PATCH_VALUE"   # ...and is refused by its shape, as before
