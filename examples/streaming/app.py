"""streaming: generators, whose items reach the caller as they are made.

    bin/poolnode --app examples/streaming/app.py --workers 2
"""

import asyncio
import time

from pyfleet import App

app = App()


@app.function
def countdown(payload):
    for i in range(payload["n"], 0, -1):
        yield i


@app.function
async def ticks(payload):
    """One item every ``ms`` milliseconds: an async generator."""
    for i in range(payload["n"]):
        await asyncio.sleep(payload["ms"] / 1000)
        yield {"i": i}


@app.function
def progress(payload):
    """A job that reports as it goes: a plain generator doing work."""
    total = 0
    for step in range(payload["steps"]):
        total += sum(range(100_000))
        yield {"step": step + 1, "of": payload["steps"]}
    yield {"done": total}
