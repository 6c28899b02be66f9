"""Functions the pool tests call: quick, slow, streaming and crashing.
Each takes the whole body (its one parameter is named payload: README,
"Writing an app"), a bare number for most."""
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
def sleep(payload):
    time.sleep(payload / 1000)
    return payload


@app.function
async def slow_async(payload):
    await asyncio.sleep(payload / 1000)
    return payload


@app.function
def gen(payload):
    for i in range(payload):
        yield {"i": i}


@app.function
def bad(payload):
    raise BadRequest("payload is never right")


@app.function
def pid(payload):
    return os.getpid()


_hoard = []


@app.function
def leak(payload):
    """Keeps payload megabytes for the life of the worker."""
    _hoard.append(bytearray(payload * 1024 * 1024))
    return len(_hoard)


@app.function
async def hang(payload):
    """Blocks the event loop, so the worker stops answering health checks."""
    time.sleep(payload)
    return payload


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
