"""The chaos proxy's configuration and its PostgreSQL framing, without a network.

Bad values fail when a toxic or proxy is built, naming the parameter and the
accepted range; the wire-protocol scanner finds the same messages however the
bytes are cut into chunks.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_db.chaos._pgwire import (
    STARTUP,
    FrameScanner,
    counts_as_query,
    error_response,
    is_commit,
    parse_bind,
    parse_parse,
    parse_query,
    ready_for_query,
)
from resilient_db.chaos.proxy import (
    Bandwidth,
    ChaosProxy,
    DropCommitAck,
    FailFirstN,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
)


@pytest.mark.parametrize(
    ("build", "error", "names"),
    [
        (lambda: Latency(latency=-0.1), ValueError, "latency"),
        (lambda: Latency(latency=0.1, jitter=float("nan")), ValueError, "jitter"),
        (lambda: Latency(latency="1"), TypeError, "latency"),
        (lambda: Latency(latency=1, distribution="pareto"), ValueError, "distribution"),
        (lambda: Latency(latency=1, toxicity=1.5), ValueError, "toxicity"),
        (lambda: Latency(latency=1, stream="sideways"), ValueError, "stream"),
        (lambda: Bandwidth(rate=0), ValueError, "rate"),
        (lambda: SlowClose(delay=-1), ValueError, "delay"),
        (lambda: Timeout(timeout=True), TypeError, "timeout"),
        (lambda: ResetPeer(timeout=-1), ValueError, "timeout"),
        (lambda: Slicer(average_size=0), ValueError, "average_size"),
        (lambda: Slicer(average_size=10, size_variation=10), ValueError, "size_variation"),
        (lambda: LimitData(bytes=-1), ValueError, "bytes"),
        (lambda: FailFirstN(n=0), ValueError, "n"),
        (lambda: FailFirstN(n=1, sqlstate="4001"), ValueError, "sqlstate"),
        (lambda: FailFirstN(n=1, match="("), ValueError, "match"),
        (lambda: FailFirstN(n=1, stream="downstream"), ValueError, "stream"),
        (lambda: DropCommitAck(count=0), ValueError, "count"),
        (lambda: ChaosProxy("localhost"), ValueError, "upstream"),
        (lambda: ChaosProxy("localhost:0"), ValueError, "upstream"),
        (lambda: ChaosProxy("localhost:5432", listen="127.0.0.1:70000"), ValueError, "listen"),
        (lambda: ChaosProxy("localhost:5432", seed="7"), TypeError, "seed"),
        (lambda: ChaosProxy("localhost:5432", connect_delay=-1), ValueError, "connect_delay"),
        (lambda: ChaosProxy("localhost:5432", fault_log_size=0), ValueError, "fault_log_size"),
    ],
)
def test_bad_configuration_is_refused_at_construction_naming_the_parameter(
    build: Callable[[], Any], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=names):
        build()


def test_toxics_are_named_like_toxiproxys_by_default() -> None:
    assert Latency(latency=0.1).name == "latency_downstream"
    assert Timeout(timeout=0, stream="upstream").name == "timeout_upstream"
    assert FailFirstN(n=1).stream == "upstream"
    assert Latency(latency=1, name="slow").name == "slow"


def test_toxic_names_are_unique_and_removal_needs_an_existing_name() -> None:
    proxy = ChaosProxy("127.0.0.1:5432", toxics=[Latency(latency=0.1, name="a")])
    with pytest.raises(ValueError, match="already has a toxic named 'a'"):
        proxy.add_toxic(Timeout(timeout=1, name="a"))
    with pytest.raises(KeyError, match="no toxic named 'b'"):
        proxy.remove_toxic("b")
    updated = proxy.update_toxic("a", latency=0.3)
    assert proxy.toxics == (updated,) and updated.latency == 0.3
    with pytest.raises(ValueError, match="latency"):
        proxy.update_toxic("a", latency=-1)
    assert proxy.toxics == (updated,)


def test_protocol_toxics_need_a_postgres_aware_proxy() -> None:
    proxy = ChaosProxy("127.0.0.1:5432", postgres=False)
    with pytest.raises(ValueError, match="postgres=True"):
        proxy.add_toxic(FailFirstN(n=1))


def test_kill_refuses_unknown_modes_and_selections() -> None:
    proxy = ChaosProxy("127.0.0.1:5432")
    with pytest.raises(ValueError, match="mode"):
        proxy.kill(mode="kindly")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="which"):
        proxy.kill("some")  # type: ignore[arg-type]


def test_proxied_url_needs_the_real_port() -> None:
    proxy = ChaosProxy("127.0.0.1:5432")
    with pytest.raises(RuntimeError, match="start the proxy"):
        proxy.proxied_url("postgresql+asyncpg://u:secret@db:5432/app")
    with proxy:
        url = proxy.proxied_url("postgresql+asyncpg://u:secret@db:5432/app")
    assert url == f"postgresql+asyncpg://u:secret@127.0.0.1:{proxy.port}/app"


# -- the wire protocol ------------------------------------------------------------------


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _session_bytes() -> bytes:
    startup_body = struct.pack("!i", 196608) + b"user\x00postgres\x00\x00"
    return b"".join(
        [
            struct.pack("!i", len(startup_body) + 4) + startup_body,
            _message(b"Q", b"BEGIN\x00"),
            _message(b"P", b"s1\x00SELECT $1\x00\x00\x00"),
            _message(b"D", b"Ss1\x00"),
            _message(b"H", b""),
            _message(b"B", b"\x00s1\x00\x00\x00\x00\x00\x00\x00"),
            _message(b"E", b"\x00\x00\x00\x00\x00"),
            _message(b"S", b""),
            _message(b"X", b""),
        ]
    )


def _scan(chunks: list[bytes]) -> list[tuple[int, bytes | None]]:
    scanner = FrameScanner(startup=True, capture=frozenset({STARTUP, ord("Q"), ord("P")}))
    return [(f.type, f.body) for chunk in chunks for f in scanner.feed(chunk)]


@given(st.lists(st.integers(min_value=0, max_value=len(_session_bytes())), max_size=30))
def test_the_scanner_finds_the_same_messages_however_the_bytes_are_cut(cuts: list[int]) -> None:
    data = _session_bytes()
    points = [0, *sorted(cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    assert _scan(chunks) == _scan([data])


def test_the_scanner_reads_the_messages_the_proxy_acts_on() -> None:
    frames = _scan([_session_bytes()])
    kinds = [chr(kind) if kind else "startup" for kind, _ in frames]
    assert kinds == ["startup", "Q", "P", "D", "H", "B", "E", "S", "X"]
    assert parse_query(frames[1][1] or b"") == "BEGIN"
    assert parse_parse(frames[2][1] or b"") == ("s1", "SELECT $1")
    assert parse_bind(b"p\x00s1\x00\x00\x00") == ("p", "s1")


def test_the_scanner_gives_up_on_bytes_that_are_not_postgres() -> None:
    scanner = FrameScanner(startup=True, capture=frozenset())
    scanner.feed(b"GET / HTTP/1.1\r\n")
    assert scanner.broken


def test_an_injected_error_is_framed_as_the_server_frames_it() -> None:
    data = error_response("40001", "could not serialize") + ready_for_query("E")
    scanner = FrameScanner(startup=False, capture=frozenset({ord("E"), ord("Z")}))
    (error, ready) = scanner.feed(data)
    assert (chr(error.type), chr(ready.type), ready.body) == ("E", "Z", b"E")
    items = (error.body or b"").split(b"\x00")
    fields = {item[:1].decode(): item[1:].decode() for item in items if item}
    assert fields == {"S": "ERROR", "V": "ERROR", "C": "40001", "M": "could not serialize"}


@pytest.mark.parametrize(
    ("sql", "counts"),
    [
        ("SELECT 1", True),
        ("  /* hint */ insert into t values (1)", True),
        ("(select 1) union (select 2)", True),
        ("WITH x AS (SELECT 1) SELECT * FROM x", True),
        ("CREATE TABLE t (id int)", True),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", False),
        ("-- comment\nCOMMIT", False),
        ("ROLLBACK TO SAVEPOINT sa_1", False),
        ("SET LOCAL statement_timeout = 100", False),
        ("show transaction isolation level", False),
        ("select pg_catalog.version()", False),
        ("select current_schema()", False),
        ("", False),
    ],
)
def test_what_counts_as_a_query(sql: str, counts: bool) -> None:
    assert counts_as_query(sql) is counts


@pytest.mark.parametrize(
    ("sql", "commit"),
    [("COMMIT", True), ("end;", True), ("commit prepared 'x'", True), ("COMMITTED", False)],
)
def test_what_is_a_commit(sql: str, commit: bool) -> None:
    assert is_commit(sql) is commit
