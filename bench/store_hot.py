"""Microbenchmark: the store's hot writes alone (PROTOCOL section 5), no server, no sockets.

Run (from the repository root)::

    .venv/bin/python bench/store_hot.py --streams 50 --events 200
    .venv/bin/python bench/store_hot.py --sent-with-append        # append(sent=True), no mark_sent
    .venv/bin/python bench/store_hot.py --store-module /tmp/old_store.py   # compare another version
    .venv/bin/python bench/store_hot.py --url postgresql+asyncpg://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/store_hot.py --profile 25              # cProfile, top 25 by tottime

One process, one event loop, one :class:`Store`. Each of ``--streams`` concurrent streams owns a
context and, ``--events`` times, awaits ``append_event`` then ``mark_sent`` (attempt 1) then
``ack_through`` in turn: the write pattern of one WebSocket whose client acks every event at once.
The store group-commits what the streams issue together, so this measures the merged hot paths.
SQLite runs in a fresh temporary directory (WAL, ``synchronous=NORMAL``); with ``--url`` on
PostgreSQL the tables go to a fresh schema that is dropped afterwards.

Prints events/s (wall clock) and CPU microseconds per event (``time.process_time``, this process
only: the SQLite library's work is in-process, PostgreSQL's server work is not counted). The best
of ``--repeat`` runs is reported, each on a fresh database.

``--store-module PATH`` loads the store from a file instead of ``pipeproof.impl.store`` (e.g. the
previous version, ``git show HEAD~1:impl/store.py > /tmp/old_store.py``) to compare two versions
in one session on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib
import importlib.util
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any


def _load_store_module(path: str | None) -> ModuleType:
    if path is None:
        return importlib.import_module("pipeproof.impl.store")
    spec = importlib.util.spec_from_file_location("pipeproof_bench_store", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


async def _stream(store: Any, context_id: str, events: int, sent_with_append: bool) -> None:
    for i in range(events):
        if sent_with_append:
            record = await store.append_event(context_id, "run", "agent_thinking", {"i": i}, time.time(), sent=True)
        else:
            record = await store.append_event(context_id, "run", "agent_thinking", {"i": i}, time.time())
            await store.mark_sent(context_id, record.seq, 1)
        await store.ack_through(context_id, record.seq)


async def _one_run(module: ModuleType, url: str, args: argparse.Namespace) -> tuple[float, float]:
    schema = None
    kwargs: dict[str, Any] = {"pool_size": 4, "timeout": 10.0}
    if url.startswith("postgresql"):
        schema = f"pp_bench_{uuid.uuid4().hex[:10]}"
        kwargs["pg_schema"] = schema
    store = await module.open_store(url, **kwargs)
    try:
        contexts = [
            (await store.get_or_create_context(f"user-{i}", "acme", time.time(), 3600.0)).context_id
            for i in range(args.streams)
        ]
        profiler = cProfile.Profile() if args.profile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        await asyncio.gather(*(_stream(store, c, args.events, args.sent_with_append) for c in contexts))
        if profiler is not None:
            profiler.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
        total = args.streams * args.events
        return total / wall, cpu / total * 1e6
    finally:
        await store.close()
        if schema is not None:
            from sqlalchemy import text
            from sqlalchemy.ext.asyncio import create_async_engine

            engine = create_async_engine(url)
            async with engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            await engine.dispose()


async def _main(args: argparse.Namespace) -> None:
    module = _load_store_module(args.store_module)
    results = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="pp-store-hot-") as tmp:
            url = args.url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
            results.append(await _one_run(module, url, args))
    rate, cpu = max(results, key=lambda r: r[0])
    label = args.store_module or "pipeproof.impl.store"
    mode = "append(sent=True)+ack" if args.sent_with_append else "append+mark_sent+ack"
    print(
        f"{label}: {mode}, {args.streams} streams x {args.events} events: "
        f"{rate:,.0f} events/s, {cpu:,.0f} CPU us/event "
        f"(all runs: {', '.join(f'{r:,.0f}/s {c:,.0f}us' for r, c in results)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", default=None, help="default: SQLite in a temporary directory")
    parser.add_argument("--store-module", default=None, help="load the store from this file")
    parser.add_argument("--sent-with-append", action="store_true", help="append(sent=True), no mark_sent")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N functions")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
