"""Functions the pool tests call: quick, slow, streaming and crashing."""
import asyncio
import os
import time

from pyfleet import App, BadRequest

app = App()


@app.function
def echo(payload):
    return payload


@app.function
def sleep(ms):
    time.sleep(ms / 1000)
    return ms


@app.function
async def slow_async(ms):
    await asyncio.sleep(ms / 1000)
    return ms


@app.function
def gen(n):
    for i in range(n):
        yield {"i": i}


@app.function
def bad(payload):
    raise BadRequest("payload is never right")


@app.function
def pid(payload):
    return os.getpid()


_hoard = []


@app.function
def leak(mb):
    """Keeps mb megabytes for the life of the worker."""
    _hoard.append(bytearray(mb * 1024 * 1024))
    return len(_hoard)


@app.function
async def hang(seconds):
    """Blocks the event loop, so the worker stops answering health checks."""
    time.sleep(seconds)
    return seconds
