"""streaming: items arrive as the function yields them.

    python examples/streaming/client.py [NATS_URL]

Reads a countdown, then 10 ticks 100 ms apart, timing each arrival (the
first comes long before the last: nothing waits for the end), two streams
at once from AsyncClient, and a stream whose deadline passes midway.
"""

import asyncio
import os
import sys
import time

from pyfleet import AsyncClient, Client, DeadlineExceeded

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
N, MS = 10, 100

with Client(url, pool="default") as c:
    print("countdown ->", list(c.stream("countdown", {"n": 5})))

    start = time.perf_counter()
    arrivals = []
    for item in c.stream("ticks", {"n": N, "ms": MS}):
        arrivals.append((time.perf_counter() - start) * 1000)
        print(f"tick {item['i']} at {arrivals[-1]:.0f} ms")
    if len(arrivals) != N or arrivals[0] > arrivals[-1] / 2:
        sys.exit(f"ticks did not stream: arrivals {arrivals}")

    for item in c.stream("progress", {"steps": 3}):
        print("progress ->", item)

    got = []
    try:
        for item in c.stream("ticks", {"n": 50, "ms": MS}, timeout=0.55):
            got.append(item["i"])
        sys.exit("a stream past its deadline did not raise")
    except DeadlineExceeded as e:
        print(f"deadline 550 ms: {len(got)} items, then {e.code} {e.type}")


async def two_at_once():
    async with AsyncClient(url, pool="default") as ac:
        async def read(n):
            return [item["i"] async for item in ac.stream("ticks", {"n": n, "ms": MS})]

        start = time.perf_counter()
        a, b = await asyncio.gather(read(5), read(5))
        return a, b, time.perf_counter() - start


a, b, took = asyncio.run(two_at_once())
print(f"two streams at once: {a} and {b} in {took * 1000:.0f} ms")
print(f"figure: {N} items {MS} ms apart: first at {arrivals[0]:.0f} ms, last at {arrivals[-1]:.0f} ms")
