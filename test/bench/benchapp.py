"""The functions `make bench` calls (test/bench): the same echo as a plain
function and as a coroutine, which a worker runs in different ways."""

from __future__ import annotations

from typing import Any

from pyfleet import App

app = App()


@app.function
def echo(payload: Any) -> Any:
    """Returns its payload."""
    return payload


@app.function
async def echo_async(payload: Any) -> Any:
    """Returns its payload, on the worker's event loop."""
    return payload
