"""pyfleet: plain Python functions served to NATS by supervised worker processes.

    from pyfleet import App, BadRequest

    app = App()

    @app.function
    def echo(payload):
        return payload

The worker (``python -m pyfleet.worker``, started by poolnode) imports the
module that holds the App and serves its functions. Its modules, one concern
each: ``app`` (this registry), ``codec`` (payloads and result frames),
``calls`` (one call to its END frame), ``threads`` (the call threads),
``stream`` (one Batches stream), ``context`` (``Context``, which a
function gets by annotating a parameter ``pyfleet.Context``), ``servicer`` (the gRPC server and its
auth), ``process`` (secret, lifeline, parent death, signals, handshake) and
``worker`` (the entry point that wires them).

The client, to call functions from anywhere (needs ``pyfleet[client]``,
which adds nats-py; workers do not):

    from pyfleet import Client

    with Client("nats://127.0.0.1:4222") as c:
        c.call("echo", {"hi": 1})

``client`` (the blocking Client) runs ``aio`` (AsyncClient) on a loop of
its own; ``errors`` holds the exception per status code. ``Client`` and
``AsyncClient`` are imported on first use, so that ``import pyfleet`` in a
worker never imports nats-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .app import App, FunctionSpec, Kind, worker_id
from .context import Context
from .errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    NotFound,
    PayloadTooLarge,
    RemoteError,
    SessionLost,
    Unavailable,
    WorkerLost,
)

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .client import Client

__all__ = [
    "App",
    "AsyncClient",
    "BadRequest",
    "Cancelled",
    "Client",
    "Context",
    "DeadlineExceeded",
    "FunctionSpec",
    "Kind",
    "NotFound",
    "PayloadTooLarge",
    "RemoteError",
    "SessionLost",
    "Unavailable",
    "WorkerLost",
    "worker_id",
]
__version__ = "0.1.0"

_LAZY = {"Client": "client", "AsyncClient": "aio"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyfleet' has no attribute {name!r}")
    try:
        import nats  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"pyfleet.{name} needs the NATS client nats-py: pip install 'pyfleet[client]'",
            name="nats",
        ) from exc
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
