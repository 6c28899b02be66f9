"""Test app for the hostile supervision and memory tests
(test/hostile_supervision_test.go, test/hostile_memory_test.go)."""

from __future__ import annotations

import time
from typing import Any

from pyfleet import App

app = App()


@app.function
def echo(payload: Any) -> Any:
    return payload


@app.function(raw=True)
def huge(payload: bytes) -> bytes:
    """int(payload) MB back: over 64 the result is larger than a gRPC message
    may be, so the worker's gRPC ends its stream to the node instead of
    sending it, and the worker process lives on."""
    return b"x" * (int(payload) << 20)


@app.function(raw=True)
def slow_raw(payload: bytes) -> bytes:
    """Takes a body of any size (raw: no JSON cost), holds the call 200 ms,
    answers with the body's length."""
    time.sleep(0.2)
    return str(len(payload)).encode()


@app.function
async def trickle(payload: Any):
    """Streams without end, slowly (4 KB every 20 ms): a job of it reaches
    the node's result limit (1 MiB on the embedded server) in about 5 s,
    holding its worker meanwhile."""
    import asyncio

    item = "t" * 4096
    while True:
        yield item
        await asyncio.sleep(0.02)
