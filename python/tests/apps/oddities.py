"""An app with the awkward cases the demo does not have."""

import asyncio
import os
import sys
import time

from pyfleet import App, BadRequest

# Garbage at import, and a line left unfinished: the handshake must still
# arrive on a line of its own.
print("garbage at import {not json")
print("PYFLEET-READY-ish noise", file=sys.stderr)
print("unfinished line", end="")

app = App()


@app.function
def bad_request(payload):
    raise BadRequest("you asked wrong")


@app.function
def not_json(payload):
    return {1, 2, 3}


@app.function
def nan(payload):
    return float("nan")


@app.function(raw=True)
def raw_str(data):
    return "not bytes"


@app.function(raw=True)
def raw_view(data):
    return memoryview(bytearray(data + b"!"))


@app.function
async def agen(payload):
    for i in range(payload["n"]):
        await asyncio.sleep(0)
        yield {"i": i}


@app.function
def gen_fails(payload):
    yield 1
    yield 2
    raise ValueError("broke after two")


@app.function(raw=True)
def raw_gen(data):
    for b in data:
        yield bytes([b])


@app.function
async def ignore_cancel_then_fail(payload):
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        raise KeyError("cleanup failed")


@app.function
def exits(payload):
    sys.exit(7)


@app.function
def fork_child(payload):
    """Forks a child that sleeps; returns its pid."""
    pid = os.fork()
    if pid == 0:
        time.sleep(payload.get("seconds", 60))
        os._exit(0)
    return {"pid": pid}


@app.function
def env(payload):
    return {k: v for k, v in os.environ.items() if k.startswith("PYFLEET_")}


@app.function
def big_count(payload):
    yield from range(payload["n"])


@app.function
async def mark_when_cancelled(payload):
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        with open(payload["path"], "w") as f:
            f.write("cancelled")
        raise
