"""The event ring is bounded in bytes as well as in events: long log lines evict the oldest events
(clients see `truncated`), and sequence numbers go on."""

from tdb_server.engine.events import EventLog, Output


def test_long_lines_are_bounded_in_bytes():
    log = EventLog(capacity=4096, capacity_bytes=1 << 20)
    for i in range(1000):
        log.emit("r1", Output(category="console", site="blocks.0.attn.out", text="x" * 16_384))
    events, truncated = log.since(0)
    assert truncated and 50 <= len(events) <= 64              # about 1 MiB of 16 KiB lines
    assert events[-1].seq == 1000 and log.last_seq == 1000
    assert log._bytes == sum(log._sizes) <= 1 << 20


def test_small_events_are_bounded_by_count():
    log = EventLog(capacity=10)
    for _ in range(25):
        log.emit("r1", Output(category="console", site="", text="hi"))
    events, truncated = log.since(0)
    assert truncated and [e.seq for e in events] == list(range(16, 26))
    assert log._bytes == sum(log._sizes)
