"""The app the call-context tests call (test_context.py): each function
takes a pyfleet.Context and reports what it saw in its answer or, when the
caller is gone by then, in a file the test names."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from pyfleet import App, Context, worker_id

app = App()


def _seen(ctx: Context) -> dict[str, Any]:
    return {
        "request_id": ctx.request_id,
        "job_id": ctx.job_id,
        "attempt": ctx.attempt,
        "deadline": ctx.deadline,
        # JSON has no infinity, remaining()'s value without a deadline.
        "remaining": ctx.remaining() if ctx.deadline is not None else None,
        "cancelled": ctx.cancelled,
    }


@app.function
def info(payload: Any, ctx: Context) -> dict[str, Any]:
    return {"payload": payload, **_seen(ctx)}


@app.function
async def ainfo(ctx: Context, payload: Any) -> dict[str, Any]:
    return {"payload": payload, **_seen(ctx)}


@app.function
def plain(payload: Any) -> Any:
    return payload


@app.function
def ctx_echo(payload: Any, ctx: Context) -> Any:
    """plain, with a context it does not use: the cost of the injection
    (python/bench/context_cost.py)."""
    return payload


@app.function
def ctx_progress(payload: Any, ctx: Context) -> Any:
    """plain, reporting progress once per call: the cost of ctx.progress
    under its rate limit."""
    ctx.progress(1)
    return payload


@app.function
def flaky(payload: Any, ctx: Context) -> dict[str, Any]:
    """Fails its first delivery; returns what the second saw."""
    if ctx.attempt == 1:
        raise RuntimeError("first delivery fails")
    return {"attempt": ctx.attempt, "job_id": ctx.job_id}


@app.function
def ticker(payload: dict[str, str], ctx: Context) -> Any:
    """Yields a number every 50 ms until cancelled; then writes payload["out"]."""
    i = 0
    while not ctx.cancelled:
        yield i
        i += 1
        time.sleep(0.05)
    _write_whole(payload["out"], {"items": i, "remaining": ctx.remaining()})


@app.function
def whoami(payload: Any) -> str:
    return worker_id()


def _write_whole(path: str, value: Any) -> None:
    """Writes JSON by rename, so a test polling for the file never reads it half written."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _wait_for(path: str, limit: float = 30) -> None:
    end = time.monotonic() + limit
    while not Path(path).exists() and time.monotonic() < end:
        time.sleep(0.01)


@app.function
def steps(payload: dict[str, Any], ctx: Context) -> int:
    """Reports {"done": 0, "total": n}, waits for the file payload["gate"],
    then reports done 1..n: a caller that sees done 0 before it makes the
    file saw it live."""
    n = payload["n"]
    ctx.progress({"done": 0, "total": n})
    _wait_for(payload["gate"])
    for i in range(1, n + 1):
        time.sleep(0.15)  # past the rate limit: each value is sent
        ctx.progress({"done": i, "total": n})
    return n


@app.function
def flood(payload: int, ctx: Context) -> int:
    """Reports progress payload times in a tight loop."""
    for i in range(payload):
        ctx.progress(i)
    return payload


@app.function
def logs(payload: dict[str, Any], ctx: Context) -> str:
    ctx.log.info("hello %s", payload["who"])
    try:
        raise ValueError("boom\nsecond line of the message")
    except ValueError:
        ctx.log.exception("it failed for %s", payload["who"])
    ctx.log.warning("careful")
    ctx.log.debug("details")
    return "logged"


@app.function
def poll(payload: dict[str, str], ctx: Context) -> str:
    """Marks payload["started"], polls ctx.cancelled, then writes what it
    saw to payload["out"] and returns."""
    Path(payload["started"]).touch()
    while not ctx.cancelled:
        time.sleep(0.01)
    _write_whole(payload["out"], {"remaining": ctx.remaining(), "worker": worker_id()})
    return "stopped"


@app.function
def hang(payload: dict[str, str], ctx: Context) -> str:
    """Marks payload["started"] and sleeps, never polling ctx.cancelled."""
    Path(payload["started"]).touch()
    time.sleep(600)
    return "woke"


@app.function
async def asleep(payload: dict[str, str], ctx: Context) -> str:
    """Marks payload["started"] and sleeps; on cancel writes what it saw."""
    Path(payload["started"]).touch()
    try:
        await asyncio.sleep(600)
    except asyncio.CancelledError:
        _write_whole(payload["out"], {"cancelled": ctx.cancelled})
        raise
    return "woke"
