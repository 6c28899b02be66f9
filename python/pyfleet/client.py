"""Client: the blocking pyfleet client, safe to share between threads.

    with Client("nats://127.0.0.1:4222", pool="default") as c:
        c.call("echo", {"hi": 1}, timeout=5.0)

One Client is one NATS connection and one asyncio loop in a thread of its
own that the Client starts and ``close()`` stops and joins; every method
runs the AsyncClient coroutine of the same name on that loop and waits for
it, so any number of threads may call at once (nats-py itself is not
thread-safe). Needs nats-py: install ``pyfleet[client]``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, Generic, TypeVar

from .aio import (
    DEFAULT_HEARTBEAT,
    DEFAULT_SERVERS,
    DEFAULT_TIMEOUT,
    AsyncClient,
    AsyncEvents,
    AsyncJob,
    AsyncSession,
    AsyncStream,
)
from .errors import Unavailable

__all__ = ["Client", "Session", "Job", "Stream", "Events"]

T = TypeVar("T")


class _Blocking(Generic[T]):
    """A blocking iterator over an async one that runs on the client's
    loop: what Stream and Events share."""

    def __init__(self, client: Client, ait: Any) -> None:
        self._c = client
        self._ait = ait
        client._run(ait.start())

    def __iter__(self) -> _Blocking[T]:
        return self

    def __next__(self) -> T:
        more, item = self._c._run(_next(self._ait))
        if not more:
            raise StopIteration
        return item

    def close(self) -> None:
        if not self._c.closed:
            self._c._run(self._ait.aclose())

    def __enter__(self) -> _Blocking[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stream(_Blocking[Any]):
    """The items of a streamed call as they are produced (``for item in
    ...``). The request is sent when the stream is made. ``close()`` (or
    leaving ``with``) stops listening early."""

    def __init__(self, client: Client, astream: AsyncStream) -> None:
        super().__init__(client, astream)
        self._s = astream

    @property
    def node(self) -> str | None:
        """The node streaming, once it has answered."""
        return self._s.node


async def _next(it: Any) -> tuple[bool, Any]:
    # StopAsyncIteration must not cross a Future: report the end instead.
    try:
        return True, await it.__anext__()
    except StopAsyncIteration:
        return False, None


class Session:
    """Calls that all reach the same worker (``with c.session() as s``):
    the first may reach any node of the pool, the rest go to that node.
    Once the worker is gone, calls raise SessionLost."""

    def __init__(self, client: Client, asession: AsyncSession) -> None:
        self._c = client
        self._s = asession

    @property
    def key(self) -> str:
        """The session's key, sent as Pyfleet-Session."""
        return self._s.key

    @property
    def node(self) -> str | None:
        """The node that holds the session, once a call reached it."""
        return self._s.node

    def call(
        self,
        function: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        raw: bool = False,
        request_id: str | None = None,
        progress: Callable[[Any], None] | None = None,
    ) -> Any:
        """As Client.call, on the session's worker."""
        return self._c._run(
            self._s.call(function, payload, timeout=timeout, raw=raw, request_id=request_id, progress=progress)
        )

    def stream(
        self,
        function: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        raw: bool = False,
        request_id: str | None = None,
    ) -> Stream:
        """As Client.stream, on the session's worker."""
        s = self._s.stream(function, payload, timeout=timeout, raw=raw, request_id=request_id)
        return Stream(self._c, s)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"Session(key={self.key!r}, node={self.node!r})"


class Job:
    """A job: ``id`` (its Nats-Msg-Id) and ``result(timeout=)``."""

    def __init__(self, client: Client, ajob: AsyncJob) -> None:
        self._c = client
        self._j = ajob

    @property
    def id(self) -> str:
        return self._j.id

    @property
    def pool(self) -> str:
        return self._j.pool

    @property
    def function(self) -> str | None:
        return self._j.function

    @property
    def duplicate(self) -> bool:
        """Whether the stream already had this id (within its two-minute
        window), so the job was not queued again."""
        return self._j.duplicate

    @property
    def seq(self) -> int | None:
        """The job's sequence in the jobs stream, when this client submitted it."""
        return self._j.seq

    @property
    def at(self) -> datetime | None:
        """When a delayed job (``delay``, ``at``) is due; None otherwise."""
        return self._j.at

    def result(self, timeout: float | None = None) -> Any:
        """The stored result, waited for: the value, or the stored error
        raised (also for a dead-lettered job). ``timeout`` None waits as
        long as it takes; past it, TimeoutError (the job may still run)."""
        return self._c._run(self._j.result(timeout))

    def info(self) -> dict[str, Any]:
        """The job's status as a dict: state, attempts, node, worker,
        timestamps, last error, progress (AsyncJob.info)."""
        return self._c._run(self._j.info())

    def cancel(self) -> bool:
        """Cancels the job (AsyncJob.cancel); False if it had already ended."""
        return self._c._run(self._j.cancel())

    def status(self) -> str:
        """pending, scheduled, running, retrying, done, failed, dead or cancelled."""
        return self._c._run(self._j.status())

    def progress(self) -> Any:
        """The last progress value the job's function reported, or None."""
        return self._c._run(self._j.progress())

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, pool={self.pool!r}, function={self.function!r})"


class Events(_Blocking[dict[str, Any]]):
    """Lifecycle events as dicts, live (``for ev in ...``), from the moment
    ``events()`` returned; ends after its timeout, or at ``close()``."""


class Client:
    """A pyfleet client on one NATS connection; blocking, thread-safe.

    ``servers`` is a URL or a list of them; NATS options (``user``,
    ``password``, ``token``, ``user_credentials`` or ``creds``, ``tls``,
    ...) pass through to nats-py's ``connect``. ``timeout`` is the default
    deadline of a call; ``heartbeat`` the interval of the heartbeats each
    call asks for, so that a call whose node dies fails after three silent
    intervals with WorkerLost (None: no heartbeats). Connects at once.
    """

    def __init__(
        self,
        servers: str | list[str] = DEFAULT_SERVERS,
        pool: str = "default",
        prefix: str = "pyfleet",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat: float | None = DEFAULT_HEARTBEAT,
        **connect_options: Any,
    ) -> None:
        self._aio = AsyncClient(servers, pool, prefix, timeout=timeout, heartbeat=heartbeat, **connect_options)
        self.closed = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="pyfleet-client", daemon=True)
        self._thread.start()
        try:
            self._run(self._aio.connect())
        except BaseException:
            self._stop()
            raise

    @property
    def pool(self) -> str:
        return self._aio.pool

    @property
    def prefix(self) -> str:
        return self._aio.prefix

    def _serve(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # What nc.close() left (its reader and flusher tasks ending)
            # finishes here, so the loop closes with nothing pending.
            tasks = asyncio.all_tasks(loop)
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.closed:
            coro.close()
            raise Unavailable("the client is closed", type="Closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("the blocking Client cannot be used from its own event loop: use AsyncClient")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            # KeyboardInterrupt in the waiting thread: the call must not
            # go on without anyone waiting for it.
            if not fut.done():
                fut.cancel()
            raise

    def _stop(self) -> None:
        self.closed = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def close(self) -> None:
        """Closes the connection and stops the client's thread; calls still
        waiting in other threads raise Unavailable. Safe to call twice."""
        with self._lock:
            if self.closed:
                return
            try:
                self._run(self._aio.close())
            finally:
                self._stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls

    def call(
        self,
        function: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        raw: bool = False,
        node: str | None = None,
        request_id: str | None = None,
        progress: Callable[[Any], None] | None = None,
    ) -> Any:
        """Calls function with payload and returns its value: JSON in and
        out, or bytes with raw=True; a streamed function's items come back
        as one list. ``node`` sends it to that node only. Raises the
        RemoteError subclass of the answer's code. ``progress`` is called
        (on the client's thread) with each value the function passes to
        ``ctx.progress``. A KeyboardInterrupt while waiting tells the node,
        which stops the call."""
        return self._run(
            self._aio.call(
                function, payload, timeout=timeout, raw=raw, node=node, request_id=request_id, progress=progress
            )
        )

    def stream(
        self,
        function: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        raw: bool = False,
        node: str | None = None,
        request_id: str | None = None,
    ) -> Stream:
        """The items of a generator function as they are produced;
        ``timeout`` bounds the whole stream."""
        s = self._aio.stream(function, payload, timeout=timeout, raw=raw, node=node, request_id=request_id)
        return Stream(self, s)

    def session(self, key: str | None = None) -> Session:
        """A session: its calls all reach the worker that took the first."""
        return Session(self, self._aio.session(key))

    # -- jobs

    def submit(
        self,
        function: str,
        payload: Any = None,
        job_id: str | None = None,
        *,
        raw: bool = False,
        reply_to: str | None = None,
        timeout: float | None = None,
        session: str | None = None,
        request_id: str | None = None,
        delay: float | None = None,
        at: datetime | None = None,
        priority: str = "normal",
    ) -> Job:
        """Submits a job and returns its handle; ``job.id`` is the
        Nats-Msg-Id (default: 16 random hex digits). ``delay`` (seconds)
        or ``at`` (a datetime) makes it due later; ``priority``: "high",
        "normal" or "low" (AsyncClient.submit)."""
        aj = self._run(
            self._aio.submit(
                function,
                payload,
                job_id,
                raw=raw,
                reply_to=reply_to,
                timeout=timeout,
                session=session,
                request_id=request_id,
                priority=priority,
                delay=delay,
                at=at,
            )
        )
        return Job(self, aj)

    def schedule(
        self,
        name: str,
        cron: str,
        function: str,
        payload: Any = None,
        *,
        raw: bool = False,
        timeout: float | None = None,
        reply_to: str | None = None,
    ) -> dict[str, Any]:
        """Runs ``function`` on ``cron`` until ``unschedule(name)``
        (AsyncClient.schedule)."""
        return self._run(
            self._aio.schedule(name, cron, function, payload, raw=raw, timeout=timeout, reply_to=reply_to)
        )

    def schedules(self) -> list[dict[str, Any]]:
        """The pool's recurring schedules, by name."""
        return self._run(self._aio.schedules())

    def unschedule(self, name: str) -> bool:
        """Removes the schedule ``name``; False when there was none."""
        return self._run(self._aio.unschedule(name))

    def job(self, job_id: str, *, raw: bool = False, function: str | None = None) -> Job:
        """A handle for a job submitted elsewhere, by its id."""
        return Job(self, self._aio.job(job_id, raw=raw, function=function))

    # -- nodes and events

    def nodes(
        self, pool: str | None = None, *, wait: float = 0.5, detail: bool = False
    ) -> list[dict[str, Any]]:
        """The nodes that answer within ``wait`` seconds, as dicts (node,
        pool, workers, busy, queued, handled, errors, ...). ``pool`` None:
        the client's pool; "*": every pool. ``detail=True`` adds each node's
        status as ``detail`` (workers one by one, per-function latency; see
        AsyncClient.nodes)."""
        return self._run(self._aio.nodes(pool, wait=wait, detail=detail))

    def functions(self, pool: str | None = None, *, wait: float = 0.5) -> list[dict[str, Any]]:
        """The functions the nodes of ``pool`` (None: the client's) serve,
        as dicts: name, pool, raw, stream, input_schema, output_schema (JSON
        Schemas, None where none was published) and nodes."""
        return self._run(self._aio.functions(pool, wait=wait))

    def events(
        self,
        timeout: float | None = None,
        *,
        pool: str | None = None,
        node: str | None = None,
        kind: str | None = None,
    ) -> Events:
        """Lifecycle events as dicts, live from now, for ``timeout`` seconds
        (None: until closed). ``pool`` None: the client's pool, "*": all."""
        return Events(self, self._aio.events(timeout, pool=pool, node=node, kind=kind))

    def __repr__(self) -> str:
        return repr(self._aio).replace("AsyncClient", "Client", 1)
