"""advanced: pipelines (each stage's output is the next one's input) run
concurrently, and every way a call fails, caught by its class.

    python examples/advanced/client.py [NATS_URL]
"""

import asyncio
import os
import sys
import time

from pyfleet import (
    AsyncClient,
    BadRequest,
    DeadlineExceeded,
    NotFound,
    RemoteError,
)

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


async def pipeline(c, doc_id):
    """fetch -> tokenize -> count -> top: four calls, each fed the last."""
    text = await c.call("fetch", {"id": doc_id})
    words = await c.call("tokenize", text)
    counts = await c.call("count", words)
    return await c.call("top", {"counts": counts, "n": 3})


async def expect(name, cls, coro, check=lambda e: True):
    """Runs coro, which must raise cls; says what came back."""
    try:
        got = await coro
    except cls as e:
        ok = check(e)
        print(f"{name}: {type(e).__name__} code {e.code} type {e.type}: {e.message}" + ("" if ok else "  <- unexpected"))
        return ok
    except RemoteError as e:
        print(f"{name}: {type(e).__name__} {e}, want {cls.__name__}")
        return False
    print(f"{name}: returned {got!r}, want {cls.__name__}")
    return False


async def main():
    async with AsyncClient(url, pool="default") as c:
        # Pipelines: all documents at once; a missing one fails its own
        # pipeline at its first stage and no other.
        ids = ["nats", "python", "go", "missing"] * 5
        start = time.perf_counter()
        results = await asyncio.gather(*(pipeline(c, i) for i in ids), return_exceptions=True)
        took = time.perf_counter() - start
        ok = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        for doc_id, r in list(zip(ids, results))[:4]:
            print(f"pipeline {doc_id} ->", r if not isinstance(r, BaseException) else f"{type(r).__name__}: {r.message}")
        if len(ok) != 15 or not all(isinstance(e, BadRequest) for e in failed):
            sys.exit(f"pipelines: {len(ok)} ok, failures {failed}")

        # A job feeds a pipeline too: its stored result is the next input.
        job = await c.submit("tokenize", "jobs keep their result until read")
        counts = await c.call("count", await job.result(timeout=30.0))
        print(f"job {job.id} -> count ->", counts)

        cases = [
            await expect("bad input (400)", BadRequest, c.call("tokenize", 42)),
            await expect("no such function (404)", NotFound, c.call("nope", {})),
            await expect("deadline (408)", DeadlineExceeded, c.call("slow", {"s": 5}, timeout=0.3)),
            await expect("the function raised (500)", RemoteError, c.call("divide", {"a": 1, "b": 0}),
                         lambda e: e.code == 500 and e.type == "ZeroDivisionError"),
            # A job that can never succeed (400) is dead-lettered at once
            # and its error stored as its result; one that raised (500)
            # would be delivered again (after 1 s, 10 s, 1 min, 5 min)
            # before its error is stored.
            await expect("a failed job's stored error", BadRequest,
                         _job_result(c, "fetch", {"id": "missing"}), lambda e: "missing" in e.message),
        ]
        if not all(cases):
            sys.exit("an error case raised the wrong class")
        print(f"figure: {len(ids)} pipelines x 4 stages in {took * 1000:.0f} ms "
              f"({len(failed)} failed at stage 1 as they should); {sum(cases)}/{len(cases)} error cases raised their class")


async def _job_result(c, function, payload):
    job = await c.submit(function, payload)
    return await job.result(timeout=30.0)


asyncio.run(main())
