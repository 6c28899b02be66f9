"""Functions the pool tests call: quick, slow, streaming and crashing."""
import asyncio
import os
import socket
import time

from node_conns import node_connections
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


@app.function(raw=True)
def big(payload):
    """Returns int(payload) megabytes: over 64 the result is larger than a
    gRPC message may be (the worker's send limit), so the worker's gRPC
    ends the stream instead of sending it."""
    return b"x" * (int(payload) << 20)


@app.function
def drop_channel(payload):
    """Shuts down the worker's connections from the node (not its listening
    socket) while the process goes on: the node's stream breaks under this
    very call, whose answer can never be sent."""
    dropped = 0
    for conn in node_connections():
        try:
            conn.shutdown(socket.SHUT_RDWR)
            dropped += 1
        except OSError:
            pass
    return dropped
