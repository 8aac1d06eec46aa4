"""tests/faultproxy.py: bytes pass, and cut, stall and delay do to a real PostgreSQL client what they
promise (a connection error at once, a hang until restored, added latency); first against a small
echo server, then through asyncpg and SQLAlchemy to PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from faultproxy import FaultProxy, Mode
from pg import PG_URL, needs_pg
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

pytestmark = pytest.mark.slow  # sockets and a database: the slow target


# -- an echo server: the proxy alone -----------------------------------------------------------------


@pytest.fixture
def echo() -> Iterator[int]:
    """A threaded TCP echo server on a loopback port; yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield port
    stop.set()
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
    listener.close()
    thread.join(5)


def roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


def test_bytes_pass_and_are_counted_both_ways(echo: int) -> None:
    with FaultProxy("127.0.0.1", echo) as proxy:
        assert proxy.mode is Mode.PASS
        assert roundtrip(proxy.port, b"hello proxy") == b"hello proxy"
        assert roundtrip(proxy.port, b"x" * 10_000) == b"x" * 10_000
        stats = proxy.stats()
        assert stats.accepted == 2
        assert stats.bytes_up == stats.bytes_down == 11 + 10_000


def test_cut_resets_open_and_new_connections_until_restored(echo: int) -> None:
    with FaultProxy("127.0.0.1", echo) as proxy:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        proxy.cut()
        # The open connection was reset: a read ends at once (an RST, or EOF if the kernel saw it
        # as such), it does not wait for the 5 s socket timeout.
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            s.sendall(b"again")
            if s.recv(4) == b"":
                raise ConnectionResetError("closed")
        s.close()
        with pytest.raises((ConnectionResetError, ConnectionRefusedError, BrokenPipeError)):
            got = roundtrip(proxy.port, b"new")
            if got == b"":
                raise ConnectionResetError("closed")
        assert proxy.stats().refused >= 1
        proxy.restore()
        assert roundtrip(proxy.port, b"back") == b"back"


def test_stall_holds_bytes_until_restored(echo: int) -> None:
    with FaultProxy("127.0.0.1", echo) as proxy:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        proxy.stall()
        s.sendall(b"held")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(4)  # nothing comes back while stalled
        assert proxy.stats().open == 1  # and the connection is still open
        proxy.restore()
        s.settimeout(5)
        assert s.recv(4) == b"held"
        s.close()


def test_delay_adds_latency_per_chunk_each_way(echo: int) -> None:
    with FaultProxy("127.0.0.1", echo) as proxy:
        roundtrip(proxy.port, b"warm")
        proxy.delay(150)
        assert proxy.mode is Mode.DELAY
        started = time.monotonic()
        assert roundtrip(proxy.port, b"slow") == b"slow"
        assert time.monotonic() - started >= 0.3  # 150 ms up and 150 ms down
        with pytest.raises(ValueError):
            proxy.delay(-1)


def test_controls_need_a_running_proxy() -> None:
    proxy = FaultProxy("127.0.0.1", 9)
    with pytest.raises(RuntimeError):
        proxy.cut()
    proxy.close()  # closing a proxy that never started is a no-op


# -- PostgreSQL through the proxy -------------------------------------------------------------------


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    assert PG_URL is not None
    with FaultProxy.for_url(PG_URL) as p:
        yield p


@pytest.fixture
async def engine(proxy: FaultProxy) -> AsyncIterator[AsyncEngine]:
    assert PG_URL is not None
    # No pool: each connect() is a new TCP connection through the proxy, which is what the tests
    # look at (a pooled connection could outlive the fault being tested).
    eng = create_async_engine(proxy.route(PG_URL), poolclass=NullPool, connect_args={"timeout": 5})
    yield eng
    await eng.dispose()


async def select_one(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT 1"))).scalar_one())


def asyncpg_dsn(proxy: FaultProxy) -> str:
    assert PG_URL is not None
    return make_url(proxy.route(PG_URL)).set(drivername="postgresql").render_as_string(hide_password=False)


@needs_pg
@pytest.mark.postgres
async def test_sqlalchemy_through_the_proxy_works_fails_on_cut_and_recovers(proxy: FaultProxy,
                                                                            engine: AsyncEngine) -> None:
    assert await select_one(engine) == 1
    assert proxy.accepted == 1 and proxy.bytes_up > 0 and proxy.bytes_down > 0
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 2"))).scalar_one() == 2
        proxy.cut()
        # A connection error, not a hang: asyncio.timeout only turns a hang into a failure here.
        async with asyncio.timeout(10):
            with pytest.raises(sa_exc.DBAPIError) as err:
                await conn.execute(text("SELECT 3"))
        assert err.value.connection_invalidated
    async with asyncio.timeout(10):
        with pytest.raises((sa_exc.DBAPIError, OSError)):
            await select_one(engine)  # new connections are reset too
    proxy.restore()
    assert await select_one(engine) == 1


@needs_pg
@pytest.mark.postgres
async def test_asyncpg_fails_fast_on_cut_and_connects_after_restore(proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(proxy), timeout=5)
    assert await conn.fetchval("SELECT 1") == 1
    proxy.cut()
    async with asyncio.timeout(10):
        with pytest.raises((asyncpg.exceptions.ConnectionDoesNotExistError, ConnectionError, OSError)):
            await conn.fetchval("SELECT 1")
    await conn.close(timeout=1)
    proxy.restore()
    conn = await asyncpg.connect(asyncpg_dsn(proxy), timeout=5)
    assert await conn.fetchval("SELECT 41 + 1") == 42
    await conn.close()


@needs_pg
@pytest.mark.postgres
async def test_stall_makes_a_query_hang_until_restore(proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(proxy), timeout=5)
    proxy.stall()
    query = asyncio.create_task(conn.fetchval("SELECT 7"))
    done, _ = await asyncio.wait({query}, timeout=0.5)
    assert not done  # hanging: no answer while stalled
    proxy.restore()
    async with asyncio.timeout(10):
        assert await query == 7
    await conn.close()


@needs_pg
@pytest.mark.postgres
async def test_delay_adds_measurable_latency_to_a_query(proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(proxy), timeout=5)
    proxy.delay(100)
    started = time.monotonic()
    assert await conn.fetchval("SELECT 1") == 1
    # One query is at least one chunk each way: 2 x 100 ms at the least.
    assert time.monotonic() - started >= 0.2
    proxy.restore()
    await conn.close()
