"""One call of a plain or async function, run to its END frame.

Generators are run by the stream (pyfleet/stream.py), which holds their
chunks to its window.

The runners catch BaseException so that every call ends with one END frame,
even if the function calls sys.exit().
"""

from __future__ import annotations

import asyncio

from typing import Any

from . import codec
from .app import FunctionSpec, Kind
from .context import Context


def runs_inline(concurrency: int, kind: Kind, context: bool = False) -> bool:
    """Whether a function of this kind runs on the event loop itself rather
    than on a call thread: a sync one, when calls come one at a time (a hand-off
    to a thread and back costs more than most calls), unless it takes a
    context: its progress and log frames must reach the node while it runs,
    which the loop cannot send while the call holds it."""
    return concurrency == 1 and kind == "sync" and not context


def invoke(call: codec.Call, spec: FunctionSpec, ctx: Context | None) -> Any:
    """Calls the function with the call's arguments (the binding rule,
    pyfleet/typed.py), and its context if it takes one (a context outside a
    stream is made here: the Unary RPC)."""
    if spec.context is None:
        return codec.invoke(spec, call)
    context = ctx if ctx is not None else Context(call)
    return codec.invoke(spec, call, lambda annotation: context)


def call_sync(call: codec.Call, spec: FunctionSpec, ctx: Context | None = None) -> codec.Result:
    try:
        value = invoke(call, spec, ctx)
        return codec.Result(id=call.id, payload=codec.encode(spec, value))
    except BaseException as exc:
        return codec.failure(call, spec, exc)


async def call_async(
    call: codec.Call, spec: FunctionSpec, ctx: Context | None = None
) -> codec.Result:
    try:
        value = await invoke(call, spec, ctx)
        return codec.Result(id=call.id, payload=codec.encode(spec, value))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return codec.failure(call, spec, exc)
