"""The app registry: the functions an App exports, as the worker serves them.

``BadRequest`` lives in ``errors`` (a function raises the class a client
catches) and is re-exported here, where functions have always found it.
"""

from __future__ import annotations

import os

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeVar, overload

from .context import context_param
from .errors import BadRequest
from .typed import Binder, describe

Kind = Literal["sync", "async", "gen", "asyncgen"]

F = TypeVar("F", bound=Callable[..., Any])

# A function name becomes one token of a NATS subject (pyfleet.req.<pool>.<name>),
# so it may not contain the separator, the wildcards or whitespace.
_BAD_NAME = re.compile(r"[.*>\s]")


@dataclass(frozen=True)
class FunctionSpec:
    """One exported function, as the worker serves it."""

    name: str
    fn: Callable[..., Any]
    raw: bool
    kind: Kind
    # context names the parameter annotated pyfleet.Context (injected by
    # the binder, never bound from the body; pyfleet/context.py), None
    # without one.
    context: str | None = None
    # How the function takes a call's body (pyfleet/typed.py).
    binder: Binder = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    # The limit on its starts across the pool ("100/s"), as declared; the
    # node enforces it (ratelimit/doc.go), None for none.
    rate_limit: str | None = None

    def __post_init__(self) -> None:
        if self.binder is None:
            object.__setattr__(self, "binder", Binder(self.fn, self.name, self.raw))

    def schemas(self) -> dict[str, Any]:
        """The JSON Schema of the body ("input") and of the return value
        ("output"), each bounded in size (typed.SCHEMA_LIMIT); None for a
        raw function's bytes."""
        return describe({self.name: self.binder})[self.name]

    @property
    def stream(self) -> bool:
        """Whether the function answers with chunks (it is a generator)."""
        return self.kind in ("gen", "asyncgen")


# protocol.ParseRate's rule: a positive count, a slash, s, m or h.
_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*/\s*([smh])\s*")


def check_rate(name: str, rate: object) -> float:
    """The calls per second of ``rate`` ("100/s", "30/m", "2/h"), or a
    ValueError naming function ``name``."""
    m = _RATE.fullmatch(rate) if isinstance(rate, str) else None
    count = float(m.group(1)) if m else 0.0
    if not m or not 0 < count <= 1e9:
        raise ValueError(
            f"function {name!r}: bad rate_limit {rate!r}: "
            'want a positive number of calls per s, m or h, such as "100/s"'
        )
    return count / {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def _kind(fn: Callable[..., Any]) -> Kind:
    if inspect.isasyncgenfunction(fn):
        return "asyncgen"
    if inspect.iscoroutinefunction(fn):
        return "async"
    if inspect.isgeneratorfunction(fn):
        return "gen"
    return "sync"


class App:
    """A set of functions that pyfleet workers serve, registered with ``@app.function``."""

    def __init__(self) -> None:
        self._functions: dict[str, FunctionSpec] = {}

    @property
    def functions(self) -> Mapping[str, FunctionSpec]:
        """The registered functions by name, in registration order (read-only)."""
        return MappingProxyType(self._functions)

    @overload
    def function(self, fn: F) -> F: ...

    @overload
    def function(
        self, *, name: str | None = None, raw: bool = False, rate_limit: str | None = None
    ) -> Callable[[F], F]: ...

    def function(
        self,
        fn: F | None = None,
        *,
        name: str | None = None,
        raw: bool = False,
        rate_limit: str | None = None,
    ) -> F | Callable[[F], F]:
        """Export a function: ``@app.function`` or ``@app.function(name=..., raw=...)``.

        ``rate_limit="100/s"`` (or ``"/m"``, ``"/h"``; the count may be a
        decimal) caps how often the function starts across every node of
        the pool, calls and jobs alike: each start waits for its slot, one
        interval after the previous one. A bad limit raises ValueError here,
        naming the function, so the worker does not start.

        A function whose only parameter is named ``payload`` takes the
        decoded request body; any other takes a JSON object whose fields
        are its parameters, converted and validated from their annotations
        (pyfleet/typed.py); either returns a JSON-serialisable value
        (dataclasses, msgspec Structs and pydantic models included). Raw
        functions take and return bytes. A signature the binder cannot
        take raises TypeError here, at import.
        Generators (sync or async) stream their items. The function itself
        is returned unchanged, so it can still be called directly.
        """

        def register(f: F) -> F:
            self._register(f, name, raw, rate_limit)
            return f

        if fn is None:
            return register
        return register(fn)

    def _register(
        self, fn: Callable[..., Any], name: str | None, raw: bool, rate_limit: str | None = None
    ) -> None:
        if not callable(fn):
            raise TypeError(f"app.function needs a callable, got {type(fn).__name__}")
        if name is None:
            name = getattr(fn, "__name__", None)
            if name is None:
                raise ValueError(f"{fn!r} has no __name__: pass name=...")
        if not name or _BAD_NAME.search(name):
            raise ValueError(
                f"bad function name {name!r}: "
                "it must be non-empty, without '.', '*', '>' or whitespace"
            )
        if name in self._functions:
            raise ValueError(f"function {name!r} is already registered")
        if rate_limit is not None:
            check_rate(name, rate_limit)
        ctx = context_param(fn)
        self._functions[name] = FunctionSpec(
            name=name,
            fn=fn,
            raw=bool(raw),
            kind=_kind(fn),
            context=ctx,
            rate_limit=rate_limit,
        )

    def __repr__(self) -> str:
        return f"App(functions={list(self._functions)})"


def worker_id() -> str:
    """This worker's name in the fleet, ``<node>/<run>/<worker>-<start>``
    (empty outside a worker): unique among all workers of all nodes, which
    ``os.getpid()`` is not where each worker runs in a PID namespace of its
    own (``--containment cgroup`` or ``pidns``: every worker numbers itself
    alike)."""
    return os.environ.get("PYFLEET_WORKER_ID", "")
