"""concurrent: many calls in flight from one AsyncClient.

    python examples/concurrent/client.py [NATS_URL]

Asks the pool how many workers it has, keeps twice that many calls in
flight, 20 per worker in all, each a 50 ms wait in a worker; prints the
throughput next to the ideal (every worker always busy) and how many
workers took part.
"""

import asyncio
import os
import sys
import time

from pyfleet import AsyncClient

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
MS = 50


async def main():
    async with AsyncClient(url, pool="default", timeout=60.0) as c:
        workers = sum(n["workers"] or 0 for n in await c.nodes())
        if workers < 1:
            sys.exit("no workers answered")
        calls, in_flight = 20 * workers, 2 * workers
        gate = asyncio.Semaphore(in_flight)

        async def one():
            async with gate:
                return await c.call("work", {"ms": MS})

        start = time.perf_counter()
        pids = await asyncio.gather(*(one() for _ in range(calls)))
        took = time.perf_counter() - start
        ideal = workers * 1000 / MS
        print(f"{calls} calls, {in_flight} in flight, in {took:.2f} s")
        print(f"figure: {calls / took:.0f} ops/s with {workers} workers "
              f"(ideal {ideal:.0f}), {len(set(pids))} workers answered")


asyncio.run(main())
