"""One call of a plain or async function, run to its END frame.

Generators are run by the stream (pyfleet/stream.py), which holds their
chunks to its window.

The runners catch BaseException so that every call ends with one END frame,
even if the function calls sys.exit().
"""

from __future__ import annotations

import asyncio

from . import codec
from .app import FunctionSpec, Kind


def runs_inline(concurrency: int, kind: Kind) -> bool:
    """Whether a function of this kind runs on the event loop itself rather
    than on a call thread: a sync one, when calls come one at a time (a hand-off
    to a thread and back costs more than most calls)."""
    return concurrency == 1 and kind == "sync"


def call_sync(call: codec.Call, spec: FunctionSpec) -> codec.Result:
    try:
        value = codec.invoke(spec, call)
        return codec.Result(id=call.id, payload=codec.encode(spec, value))
    except BaseException as exc:
        return codec.failure(call, spec, exc)


async def call_async(call: codec.Call, spec: FunctionSpec) -> codec.Result:
    try:
        value = await codec.invoke(spec, call)
        return codec.Result(id=call.id, payload=codec.encode(spec, value))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return codec.failure(call, spec, exc)
