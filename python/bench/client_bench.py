"""Call overhead of the Python client, against a running node.

    python bench/client_bench.py --nats nats://127.0.0.1:4222 [--function echo]
        [--calls 2000] [--seconds 5] [--inflight 64] [--pool default]

Prints one JSON object:
- ``call_1``: ``Client.call`` one at a time (``--calls`` of them, after a
  warm-up): p50, p90, p99 in microseconds and calls/s;
- ``async``: ``AsyncClient.call`` with ``--inflight`` calls in flight
  for ``--seconds``: calls/s and p50, p99.

The body is a 100-byte JSON object, as in test/bench. Heartbeats are on,
as by default. The client shares the machine with the node and its
workers, so figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pyfleet import AsyncClient, Client  # noqa: E402

BODY = {"pad": "x" * 88}  # 100 bytes as JSON


def percentile(sorted_us: list[float], p: float) -> float:
    if not sorted_us:
        return float("nan")
    i = min(len(sorted_us) - 1, max(0, round(p / 100 * len(sorted_us)) - 1))
    return round(sorted_us[i], 1)


def one_in_flight(url: str, pool: str, function: str, calls: int) -> dict[str, float]:
    with Client(url, pool=pool) as c:
        for _ in range(min(200, calls)):
            c.call(function, BODY)
        lat = []
        start = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            c.call(function, BODY)
            lat.append((time.perf_counter() - t) * 1e6)
        took = time.perf_counter() - start
    lat.sort()
    return {
        "calls": calls,
        "p50_us": percentile(lat, 50),
        "p90_us": percentile(lat, 90),
        "p99_us": percentile(lat, 99),
        "mean_us": round(statistics.fmean(lat), 1),
        "calls_per_s": round(calls / took, 1),
    }


async def many_in_flight(url: str, pool: str, function: str, inflight: int, seconds: float) -> dict[str, float]:
    async with AsyncClient(url, pool=pool) as c:
        await asyncio.gather(*(c.call(function, BODY) for _ in range(inflight * 4)))
        lat: list[float] = []
        errors = 0
        end = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    await c.call(function, BODY)
                except Exception:  # noqa: BLE001 - counted, reported
                    errors += 1
                lat.append((time.perf_counter() - t) * 1e6)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(inflight)))
        took = time.perf_counter() - start
    lat.sort()
    return {
        "inflight": inflight,
        "seconds": round(took, 2),
        "calls": len(lat),
        "errors": errors,
        "calls_per_s": round(len(lat) / took, 1),
        "p50_us": percentile(lat, 50),
        "p99_us": percentile(lat, 99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nats", required=True, help="NATS server URL of the node")
    ap.add_argument("--pool", default="default")
    ap.add_argument("--function", default="echo")
    ap.add_argument("--calls", type=int, default=2000, help="calls one at a time")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of the in-flight run")
    ap.add_argument("--inflight", type=int, default=64)
    a = ap.parse_args()
    if a.calls <= 0 or a.seconds <= 0 or a.inflight <= 0:
        ap.error("--calls, --seconds and --inflight must be positive")
    out = {
        "function": a.function,
        "call_1": one_in_flight(a.nats, a.pool, a.function, a.calls),
        "async": asyncio.run(many_in_flight(a.nats, a.pool, a.function, a.inflight, a.seconds)),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
