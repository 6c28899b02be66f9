"""The app of package client's tests (client/*_test.go): one function per
kind of answer and per error a caller can meet."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Iterator

from pathlib import Path

from pyfleet import App, BadRequest, Context

app = App()


@app.function
def echo(payload: Any) -> Any:
    return payload


@app.function(raw=True)
def reverse(data: bytes) -> bytes:
    return data[::-1]


@app.function
def count(payload: dict[str, int]) -> Iterator[int]:
    """Streams 0 .. n-1."""
    for i in range(payload["n"]):
        yield i


@app.function
def countfail(payload: Any) -> Iterator[int]:
    """Streams 0 and 1, then raises."""
    yield 0
    yield 1
    raise ValueError("boom")


@app.function
def whoami(payload: Any) -> dict[str, int]:
    """The worker's pid: calls in one session must all see the same."""
    return {"pid": os.getpid()}


@app.function
def fail(payload: Any) -> None:
    raise RuntimeError("this function always fails")


@app.function
def bad(payload: Any) -> None:
    raise BadRequest("bad input")


@app.function
async def wait(payload: dict[str, float]) -> dict[str, float]:
    """Awaits payload["ms"] milliseconds; a deadline cancels it cleanly."""
    await asyncio.sleep(payload["ms"] / 1000)
    return {"waited_ms": payload["ms"]}


@app.function
def block(payload: dict[str, float]) -> dict[str, float]:
    """Sleeps payload["ms"] milliseconds in the worker's thread."""
    time.sleep(payload["ms"] / 1000)
    return {"slept_ms": payload["ms"]}


@app.function
def crash(payload: Any) -> None:
    """The worker dies under the call."""
    os._exit(3)


@app.function
def big(payload: dict[str, int]) -> str:
    """A string of payload["bytes"] bytes."""
    return "x" * payload["bytes"]


@app.function
def progressive(payload: dict[str, Any], ctx: Context) -> int:
    """Reports {"done": 0} and waits for the file payload["gate"], then
    reports done 1..n: a caller that sees done 0 before it makes the file
    saw it live."""
    n = payload["n"]
    ctx.progress({"done": 0, "total": n})
    end = time.monotonic() + 30
    while not Path(payload["gate"]).exists() and time.monotonic() < end:
        time.sleep(0.01)
    for i in range(1, n + 1):
        time.sleep(0.15)  # past the worker's rate limit: each value is sent
        ctx.progress({"done": i, "total": n})
    return n


@app.function
async def cancellable(payload: dict[str, str], ctx: Context) -> str:
    """Marks payload["started"] and sleeps; writes payload["out"] when its
    caller cancels it."""
    Path(payload["started"]).touch()
    try:
        await asyncio.sleep(600)
    except asyncio.CancelledError:
        Path(payload["out"]).write_text("cancelled" if ctx.cancelled else "not marked")
        raise
    return "woke"


@app.function
def scale(values: list[float], factor: float = 2.0) -> list[float]:
    """Typed: a JSON object bound by name and validated (README, "Writing an app")."""
    return [v * factor for v in values]
