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
``stream`` (one Batches stream), ``servicer`` (the gRPC server and its
auth), ``process`` (secret, lifeline, parent death, signals, handshake) and
``worker`` (the entry point that wires them).
"""

from __future__ import annotations

from .app import App, BadRequest, FunctionSpec, Kind

__all__ = ["App", "BadRequest", "FunctionSpec", "Kind"]
__version__ = "0.1.0"
