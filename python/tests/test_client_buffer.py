"""A call's queue in the client holds at most MAX_BUFFERED bytes unread."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace


from pyfleet import aio

CHUNK = SimpleNamespace(data=b"x" * (1 << 20))


def test_a_reader_that_keeps_up_never_meets_the_bound() -> None:
    async def main() -> None:
        q = aio._CallQueue()
        for _ in range(2 * aio.MAX_BUFFERED // len(CHUNK.data)):
            q.put_nowait(CHUNK)
            assert await q.get() is CHUNK
        assert q.buffered == 0 and not q.overflow

    asyncio.run(main())


def test_past_the_bound_the_call_is_told_and_the_rest_dropped() -> None:
    async def main() -> None:
        q = aio._CallQueue()
        for _ in range(aio.MAX_BUFFERED // len(CHUNK.data) + 1):
            q.put_nowait(CHUNK)
        q.put_nowait(CHUNK)
        assert q.qsize() == 1 and q.buffered == 0
        assert await q.get() is aio._OVERFLOW

    asyncio.run(main())
