"""The app the client tests call: one function per behaviour they check."""

from __future__ import annotations

import asyncio

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyfleet import App, BadRequest

app = App()


@app.function
def echo(payload: Any) -> Any:
    return payload


@app.function
def count(payload: Any) -> Iterator[int]:
    yield from range(int(payload["n"]))


@app.function
def gated(payload: Any) -> Iterator[int]:
    """Yields 0, then waits for the file payload["gate"] to exist before
    yielding 1: a caller that gets 0 before it makes the file got it as it
    was produced."""
    yield 0
    gate = Path(payload["gate"])
    end = time.monotonic() + 30
    while not gate.exists() and time.monotonic() < end:
        time.sleep(0.01)
    yield 1


@app.function
def count_then_fail(payload: Any) -> Iterator[int]:
    yield 0
    yield 1
    raise ValueError("no more")


@app.function
def fail(payload: Any) -> None:
    raise RuntimeError("this function always fails")


@app.function
def bad(payload: Any) -> None:
    raise BadRequest(f"you asked wrong: {payload!r}")


@app.function
def sleep(payload: Any) -> float:
    time.sleep(payload / 1000)
    return payload


@app.function
async def nap(payload: Any) -> float:
    """Awaits payload milliseconds: a cancel cancels it cleanly."""
    await asyncio.sleep(payload / 1000)
    return payload


@app.function
def hold(payload: Any) -> None:
    """Makes the file payload["started"], then sleeps payload["ms"]."""
    Path(payload["started"]).touch()
    time.sleep(payload["ms"] / 1000)


@app.function
def pid(payload: Any) -> int:
    return os.getpid()


@app.function
def whereami(payload: Any) -> dict[str, Any]:
    """This worker's pid and the PID namespace that numbers it: where the
    worker runs in a namespace of its own, the host numbers it otherwise
    (conftest.locate translates)."""
    return {"pid": os.getpid(), "pidns": os.readlink("/proc/self/ns/pid")}


@app.function
def die(payload: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@app.function
def big(payload: Any) -> str:
    return "x" * int(payload)


@app.function(raw=True)
def reverse(data: bytes) -> bytes:
    return data[::-1]


@dataclass
class Thumb:
    url: str
    width: int


@app.function
def resize(url: str, width: int = 256) -> Thumb:
    """Typed: a JSON object bound by name (pyfleet/typed.py)."""
    return Thumb(url=url, width=width)
