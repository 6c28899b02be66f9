"""The errors a pyfleet call can end with, one class per status code.

A function raises ``BadRequest`` to answer 400; a client raises the class
of the code a node answered with (docs/protocol.md, "Codes and types").
This module imports nothing beyond the standard library: the worker
runtime imports it too (through ``app``), and workers need no NATS client.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "RemoteError",
    "BadRequest",
    "NotFound",
    "DeadlineExceeded",
    "SessionLost",
    "PayloadTooLarge",
    "Unavailable",
    "WorkerLost",
    "from_reply",
]


class RemoteError(Exception):
    """A call, stream or job that failed; the base of every class below.

    ``code`` is the HTTP-like status, ``type`` names the error (pyfleet's
    own, such as ``Overloaded``, or the class name of the exception the
    function raised, such as ``ValueError``), ``message`` is the remote
    message, ``node`` and ``worker`` say who answered (None when nobody
    did, e.g. a call that no node took).
    """

    code: int = 500

    def __init__(
        self,
        message: Any = "",
        *,
        code: int | None = None,
        type: str | None = None,
        node: str | None = None,
        worker: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = str(message)
        if code is not None:
            self.code = code
        # A class a function raises names itself; one made from a reply
        # carries the remote type (e.g. InvalidJobId for a 400).
        self.type = type or (self.__class__.__name__ if self.__class__ is not RemoteError else "Error")
        self.node = node
        self.worker = worker

    def __str__(self) -> str:
        where = f" (node {self.node})" if self.node else ""
        return f"{self.code} {self.type}: {self.message}{where}"

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(code={self.code}, type={self.type!r}, "
            f"message={self.message!r}, node={self.node!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields do not survive the default pickling, which
        # multiprocessing and concurrent.futures rely on.
        return (_rebuild, (self.__class__, self.message, self.code, self.type, self.node, self.worker))


def _rebuild(
    cls: type[RemoteError], message: str, code: int, typ: str, node: str | None, worker: str | None
) -> RemoteError:
    return cls(message, code=code, type=typ, node=node, worker=worker)


class BadRequest(RemoteError):
    """400: raise it from a function to answer the caller with this message;
    a client raises it when the request broke the rules (docs/protocol.md)."""

    code = 400


class NotFound(RemoteError):
    """404: the pool has no such function."""

    code = 404


class DeadlineExceeded(RemoteError):
    """408: the call's deadline passed, queued or running."""

    code = 408


class SessionLost(RemoteError):
    """410: the worker that held the session is gone."""

    code = 410


class PayloadTooLarge(RemoteError):
    """413: the request, the reply, a streamed item or a job's result is over its limit."""

    code = 413


class Cancelled(RemoteError):
    """499: the job was cancelled (``job.cancel()``, ``submit cancel``)
    before it finished."""

    code = 499


class Unavailable(RemoteError):
    """503: no node could take the call now (none running, draining,
    overloaded, no worker for a new session, results stream refusing);
    safe to retry: the call did not run."""

    code = 503


class WorkerLost(RemoteError):
    """500: the process running the call died under it, the worker or the
    whole node; the call may have run in part."""

    code = 500


_BY_CODE: dict[int, type[RemoteError]] = {
    400: BadRequest,
    404: NotFound,
    408: DeadlineExceeded,
    410: SessionLost,
    413: PayloadTooLarge,
    499: Cancelled,
    503: Unavailable,
}


def from_reply(
    code: int, typ: str, message: str, node: str | None = None, worker: str | None = None
) -> RemoteError:
    """The exception for an error reply: the class of its code, WorkerLost
    for a 500 of that type, RemoteError with the remote type otherwise."""
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = WorkerLost if code == 500 and typ == "WorkerLost" else RemoteError
    return cls(message, code=code, type=typ or "Error", node=node, worker=worker)
