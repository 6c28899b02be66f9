"""The demo app that `make run` serves: one function of each kind.

poolnode --app demo --app-dir python/examples
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from pyfleet import App, BadRequest

app = App()


def _number(payload: Any, key: str, default: float | None = None) -> float:
    """payload[key] (or payload itself when it is a number) as a number >= 0."""
    value = payload.get(key, default) if isinstance(payload, dict) else payload
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BadRequest(f"want a number >= 0 or {{{key!r}: number}}, got {payload!r}")
    return value


@app.function
def echo(payload: Any) -> Any:
    """Returns its payload."""
    return payload


@app.function
def sleep(payload: Any) -> dict[str, float]:
    """Sleeps for payload milliseconds (a number or {"ms": N})."""
    ms = _number(payload, "ms")
    time.sleep(ms / 1000)
    return {"slept_ms": ms}


@app.function
def fail(payload: Any) -> None:
    """Always raises, to show how errors travel."""
    raise RuntimeError("this function always fails")


@app.function
def count(payload: Any) -> Iterator[int]:
    """Streams 0 .. n-1 for {"n": n}."""
    for i in range(int(_number(payload, "n"))):
        yield i


@app.function
def cpu(payload: Any) -> dict[str, float]:
    """Keeps one core busy for {"ms": N} milliseconds."""
    ms = _number(payload, "ms")
    end = time.perf_counter() + ms / 1000
    loops = 0
    while time.perf_counter() < end:
        loops += 1
    return {"ms": ms, "loops": loops}


@app.function
def spawn(payload: Any) -> dict[str, int]:
    """Starts a child process that sleeps for {"seconds": S} (default 3600)
    and returns its pid; pyfleet must not leave it behind."""
    seconds = _number(payload, "seconds", 3600)
    child = subprocess.Popen(["sleep", str(seconds)], stdin=subprocess.DEVNULL)
    return {"pid": child.pid}


@app.function(name="sum")
async def add(payload: Any) -> float:
    """Adds a list of numbers, on the event loop."""
    if not isinstance(payload, list):
        raise BadRequest(f"want a list of numbers, got {payload!r}")
    try:
        return sum(payload)
    except TypeError as exc:
        raise BadRequest(f"want a list of numbers: {exc}") from None


@app.function
def scale(values: list[float], factor: float = 2.0) -> list[float]:
    """Typed: takes {"values": [...], "factor": N}, bound by name and
    validated; {"values": "x"} is a 400 naming the field."""
    return [v * factor for v in values]


@app.function(raw=True)
def reverse(data: bytes) -> bytes:
    """Returns the request body reversed, bytes in and out."""
    return data[::-1]


@app.function
async def slow_async(payload: Any) -> dict[str, float]:
    """Awaits for {"ms": N} milliseconds; cancellable, unlike sleep."""
    ms = _number(payload, "ms")
    await asyncio.sleep(ms / 1000)
    return {"slept_ms": ms}
