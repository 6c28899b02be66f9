"""The call context: what a running call knows of itself, and its ways of
talking to the node while it runs.

A function asks for it with a parameter annotated ``pyfleet.Context``; that
parameter is injected, never bound from the body:

    @app.function
    def resize(payload, ctx: Context):
        for i, url in enumerate(payload["urls"]):
            if ctx.cancelled:
                return None
            ctx.progress({"done": i, "total": len(payload["urls"])})
            ctx.log.info("resizing %s", url)

Progress and log records go to the node as frames of the call
(proto/worker.proto, PROGRESS and LOG) through a sink the stream gives each
context (pyfleet/stream.py): the sink may be called from any thread and
keeps a call's frames in order before its END frame.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
import typing
from collections.abc import Callable
from typing import Any


# ctx.progress sends at most one value per interval; the values in between
# are folded into the latest, which is sent when the interval ends (or just
# before the END frame). A loop reporting every item then costs the node
# ten messages a second, not one per item.
PROGRESS_INTERVAL_S = 0.1

_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

# A sink takes one frame of the call, as its kind ("progress" or "log"), its
# payload and a log record's level; the stream's sends it to the node. (The
# frames are built there: `import pyfleet` in a client needs no protobuf
# module loaded.)
Sink = Callable[[str, bytes, str], None]
# A scheduler runs a callback on the worker's loop after a delay (seconds),
# from any thread.
Schedule = Callable[[float, Callable[[], None]], None]


class _FrameHandler(logging.Handler):
    """Turns each record of a ctx.log into one LOG frame of its call: the
    whole formatted text (traceback included) in one record, at its Python
    level, where the node's log gets it with the request id."""

    def emit(self, record: logging.LogRecord) -> None:
        ctx = getattr(record, "pyfleet_context", None)
        if not isinstance(ctx, Context):
            return
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        ctx._log_frame(record.levelname, text)


# One logger for every context: a logging.Logger per call would be kept by
# the logging module for ever. Records do not propagate to the root logger,
# whose output on stderr the node would log a second time, line by line.
_LOGGER = logging.getLogger("pyfleet.ctx")
_LOGGER.propagate = False
_LOGGER.setLevel(logging.DEBUG)
_LOGGER.addHandler(_FrameHandler())


class Context:
    """What a call knows of itself: ``request_id``, ``job_id`` (None for a
    call), ``attempt`` (1 for the first delivery), ``deadline`` (epoch
    seconds, None without one), ``remaining()``, ``cancelled``,
    ``progress(value)`` and ``log``."""

    __slots__ = (
        "request_id",
        "job_id",
        "attempt",
        "deadline",
        "_id",
        "_sink",
        "_schedule",
        "_cancelled",
        "_lock",
        "_next",
        "_held",
        "_armed",
        "_ended",
        "_log",
    )

    def __init__(
        self,
        call: Any,
        sink: Sink | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.request_id: str = call.request_id
        self.job_id: str | None = call.job_id or None
        self.attempt: int = call.attempt or 1
        self.deadline: float | None = (
            time.time() + call.timeout_ms / 1000 if call.timeout_ms else None
        )
        self._id = call.id
        self._sink = sink
        self._schedule = schedule
        self._cancelled = False
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic time before which progress is held
        self._held: bytes | None = None
        self._armed = False
        self._ended = False
        self._log: logging.LoggerAdapter[logging.Logger] | None = None

    def remaining(self) -> float:
        """Seconds left before the deadline (0 once it passed; infinity
        without a deadline)."""
        if self.deadline is None:
            return float("inf")
        return max(0.0, self.deadline - time.time())

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled the call or its deadline passed.
        A sync function that polls it and returns keeps its worker: one that
        does not is stopped with its worker, a grace after the cancel."""
        return self._cancelled or (self.deadline is not None and time.time() >= self.deadline)

    def progress(self, value: Any) -> None:
        """Reports progress: any JSON value (``{"done": 3, "total": 10}``
        draws a progress bar in ``submit job --wait``). The caller sees the
        latest value; values closer than PROGRESS_INTERVAL_S are folded
        into the latest. TypeError if value is not JSON."""
        try:
            data = _encode_json(value).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise TypeError(f"ctx.progress needs a JSON value: {exc}") from None
        now = time.monotonic()
        with self._lock:
            if self._ended:
                return
            send_now = now >= self._next and not self._armed
            if send_now:
                self._next = now + PROGRESS_INTERVAL_S
            else:
                self._held = data
                if self._armed or self._schedule is None:
                    return
                self._armed = True
        if send_now:
            self._send("progress", data, "")
        else:
            assert self._schedule is not None
            self._schedule(self._next - now, self._release)

    def _release(self) -> None:
        """Sends the held progress value (on the worker's loop)."""
        with self._lock:
            data, self._held, self._armed = self._held, None, False
            if self._ended or data is None:
                return
            self._next = time.monotonic() + PROGRESS_INTERVAL_S
        self._send("progress", data, "")

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records reach the node's log, one record per call
        of it, with this call's request id and the record's level."""
        if self._log is None:
            self._log = logging.LoggerAdapter(_LOGGER, {"pyfleet_context": self})
        return self._log

    def _log_frame(self, level: str, text: str) -> None:
        self._send("log", text.encode(errors="replace"), level)

    def _send(self, kind: str, payload: bytes, level: str) -> None:
        sink = self._sink
        if sink is not None:
            sink(kind, payload, level)
        elif kind == "log":  # a context outside a stream (the Unary RPC)
            logging.getLogger("pyfleet").log(
                logging.getLevelName(level), payload.decode(errors="replace")
            )

    def cancel(self) -> None:
        """Marks the call cancelled (the node's cancel frame)."""
        self._cancelled = True

    def end(self) -> None:
        """Sends the held progress value, if any, and no more: the call's
        END frame is next (on the worker's loop)."""
        with self._lock:
            data, self._held = self._held, None
            self._ended = True
        if data is not None:
            self._send("progress", data, "")

    def __repr__(self) -> str:
        return (
            f"Context(request_id={self.request_id!r}, job_id={self.job_id!r}, "
            f"attempt={self.attempt}, remaining={self.remaining():.3f})"
        )


# ---------------------------------------------------------------- injection


def _is_context(annotation: Any) -> bool:
    if annotation is Context:
        return True
    # Under `from __future__ import annotations` an annotation the hints
    # could not resolve is still its text.
    return isinstance(annotation, str) and annotation.split(".")[-1] == "Context"


def context_param(fn: Callable[..., Any]) -> str | None:
    """The name of fn's parameter annotated pyfleet.Context, or None.
    ValueError if there are more than one. A typed binder (issue 13) binds
    every other parameter and passes this one by name."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that names what is not importable
        hints = {}
    found = [
        p.name
        for p in sig.parameters.values()
        if _is_context(hints.get(p.name, p.annotation))
    ]
    if len(found) > 1:
        raise ValueError(
            f"{getattr(fn, '__name__', fn)!r} has {len(found)} parameters annotated "
            f"pyfleet.Context ({', '.join(found)}): at most one may be"
        )
    return found[0] if found else None


Invoke = Callable[[Any, Context], Any]


def invoker(fn: Callable[..., Any], name: str) -> Invoke:
    """How to call fn with the body and the context its parameter `name`
    asks for: the one other parameter gets the whole body, by position when
    it can (``def f(payload, ctx: Context)``, ``def f(ctx: Context,
    payload)``); with no other, the body is not passed."""
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    others = [p for p in params if p.name != name]
    ctx_param = next(p for p in params if p.name == name)
    if not others:
        if ctx_param.kind is ctx_param.KEYWORD_ONLY:
            return lambda body, ctx: fn(**{name: ctx})
        return lambda body, ctx: fn(ctx)
    if len(others) > 1:
        raise ValueError(
            f"{getattr(fn, '__name__', fn)!r} takes {len(others)} parameters besides its "
            "pyfleet.Context: the body binds to one (typed binding is not in this worker)"
        )
    body_param = others[0]
    positional = (ctx_param.POSITIONAL_ONLY, ctx_param.POSITIONAL_OR_KEYWORD)
    if ctx_param.kind in positional and body_param.kind in positional:
        if params.index(ctx_param) < params.index(body_param):
            return lambda body, ctx: fn(ctx, body)
        return lambda body, ctx: fn(body, ctx)
    if body_param.kind is body_param.KEYWORD_ONLY:
        bname = body_param.name
        if ctx_param.kind is ctx_param.KEYWORD_ONLY:
            return lambda body, ctx: fn(**{bname: body, name: ctx})
        return lambda body, ctx: fn(ctx, **{bname: body})
    return lambda body, ctx: fn(body, **{name: ctx})
