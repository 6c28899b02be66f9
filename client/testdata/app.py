"""The app of package client's tests (client/*_test.go): one function per
kind of answer and per error a caller can meet."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Iterator

from pyfleet import App, BadRequest

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
def scale(values: list[float], factor: float = 2.0) -> list[float]:
    """Typed: a JSON object bound by name and validated (README, "Writing an app")."""
    return [v * factor for v in values]
