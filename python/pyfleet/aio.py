"""AsyncClient: call pyfleet functions, submit jobs and follow events from asyncio.

    async with AsyncClient("nats://127.0.0.1:4222", pool="default") as c:
        await c.call("echo", {"hi": 1})
        async for item in c.stream("count", {"n": 3}):
            ...

The wire contract is docs/protocol.md; cmd/submit is the Go client this
one mirrors (heartbeats, the end of a stream, the job result consumer and
its dead-letter watch, the nodes listing). Needs nats-py: install
``pyfleet[client]``. The worker runtime never imports this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import logging
import math
import secrets
import unicodedata
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api as jsapi
from nats.js import errors as jserrors

from . import _schedule
from .errors import (
    DeadlineExceeded,
    NotFound,
    PayloadTooLarge,
    RemoteError,
    Unavailable,
    WorkerLost,
    from_reply,
)

_log = logging.getLogger("pyfleet.client")

__all__ = ["AsyncClient", "AsyncSession", "AsyncJob", "AsyncStream", "AsyncEvents"]

DEFAULT_SERVERS = "nats://127.0.0.1:4222"
DEFAULT_TIMEOUT = 60.0
# A call asks its node for a heartbeat at once and then every interval;
# silence for LOSS_INTERVALS intervals means the node died holding the call
# (core NATS never says so), and the call fails then, not at its deadline.
# The same figures as `submit call` (cmd/submit/call.go).
DEFAULT_HEARTBEAT = 1.0
LOSS_INTERVALS = 3
# How long the acknowledgement of a job's publish and JetStream look-ups may take.
JS_TIMEOUT = 10.0
SERVICE_NAME = "pyfleet"  # the NATS micro service every node registers

H_TIMEOUT = "Pyfleet-Timeout"
H_SESSION = "Pyfleet-Session"
H_REQUEST_ID = "Pyfleet-Request-Id"
H_HEARTBEAT = "Pyfleet-Heartbeat"
H_PROGRESS = "Pyfleet-Progress"
H_REPLY_TO = "Pyfleet-Reply-To"
H_STATUS = "Pyfleet-Status"
H_NODE = "Pyfleet-Node"
H_WORKER = "Pyfleet-Worker"
H_STREAM = "Pyfleet-Stream"
H_JOB_ID = "Pyfleet-Job-Id"
H_MSG_ID = "Nats-Msg-Id"
H_ERROR = "Nats-Service-Error"
H_ERROR_CODE = "Nats-Service-Error-Code"


# The states of a job, as the status bucket holds them (docs/protocol.md,
# "Job status"); the last four are final.
JOB_STATES = ("pending", "scheduled", "running", "retrying", "done", "failed", "dead", "cancelled")
FINAL_STATES = frozenset({"done", "failed", "dead", "cancelled"})

# ------------------------------------------------------------------ helpers


PRIORITIES = ("high", "normal", "low")


def job_priority_suffix(priority: str) -> str:
    """What a job of ``priority`` adds to its subject (protocol.JobPriority):
    nothing for normal, ".high" or ".low" otherwise."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r}: want 'high', 'normal' or 'low'")
    return "" if priority == "normal" else "." + priority


def check_token(what: str, value: str) -> str:
    """value, if it is exactly one subject token (the node's rule,
    protocol.ValidToken): a dot would address another subject, a wildcard
    many."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    reason = None
    if value == "":
        reason = "empty"
    for ch in value:
        if reason:
            break
        if ch == ".":
            reason = "must not contain '.'"
        elif ch in "*>":
            reason = f"must not contain the wildcard {ch!r}"
        elif ch.isspace():
            reason = "must not contain white space"
        elif unicodedata.category(ch) == "Cc" or ch == "\ufffd" or unicodedata.category(ch) == "Cs":
            reason = "must not contain control or invalid characters"
    if reason:
        raise ValueError(f"{what} {value!r} must be one subject token: {reason}")
    return value


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or prefix == "":
        raise ValueError(f"prefix {prefix!r} is not a subject prefix: empty")
    for tok in prefix.split("."):
        check_token(f"prefix {prefix!r}: token", tok)
    return prefix


def check_header(what: str, value: str) -> str:
    """The node refuses a header value that is not short, printable text
    (docs/protocol.md, "Calls"); say so before sending."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if len(value.encode("utf-8", "surrogatepass")) > 256:
        raise ValueError(f"{what} is over 256 bytes")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise ValueError(f"{what} {value!r} contains control or invalid characters")
    return value


_KEY_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]")


def _now() -> str:
    """Now, RFC 3339 in UTC, as the status bucket's times are."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def status_bucket(prefix: str) -> str:
    """The jobs' status bucket of prefix (protocol.StatusBucket)."""
    base = "PYFLEET" if prefix == "pyfleet" else _NAME_BAD.sub("_", prefix).upper()
    return base + "_STATUS"


def status_key(pool: str, job_id: str) -> str:
    """The key of a job in the status bucket (protocol.StatusKey): each
    part as it is when it holds only letters, digits, _ and -, else "=" and
    its unpadded base64url, which a key may hold where a job id's other
    characters may not."""

    def part(s: str) -> str:
        if _KEY_PLAIN.fullmatch(s):
            return s
        return "=" + base64.urlsafe_b64encode(s.encode()).rstrip(b"=").decode()

    return part(pool) + "." + part(job_id)


def millis(seconds: float) -> str:
    """A duration for Pyfleet-Timeout, rounded up so a short one never becomes 0."""
    return str(max(1, math.ceil(seconds * 1000)))


def reply_margin(timeout: float) -> float:
    """How long past the deadline a client still waits, so the node's own
    408, which says more than a client-side timeout, gets through."""
    return min(max(timeout / 10, 0.5), 5.0)


def check_timeout(timeout: float | None, default: float) -> float:
    if timeout is None:
        return default
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if math.isinf(timeout):
        raise ValueError("timeout must be finite: the node needs a deadline")
    return float(timeout)


def encode(payload: Any, raw: bool) -> bytes:
    if raw:
        if payload is None:
            return b""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"raw=True sends bytes, not {type(payload).__name__}")
        return bytes(payload)
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"payload is not JSON: {exc}") from None


def decode(data: bytes, raw: bool) -> Any:
    return bytes(data) if raw else json.loads(data)


def header(msg: Msg, name: str) -> str | None:
    h = msg.headers
    if not h:
        return None
    v = h.get(name)
    if v is None:
        # Names match without regard to case (docs/protocol.md).
        low = name.lower()
        for k, val in h.items():
            if k.lower() == low:
                return val
    return v


def reply_error(msg: Msg) -> RemoteError | None:
    """The error a reply carries, or None: read as protocol.ReplyError does,
    the body first, what it lacks from the headers."""
    code_h = header(msg, H_ERROR_CODE)
    if not code_h and header(msg, H_STATUS) != "error":
        return None
    code, typ, message = 0, "", ""
    try:
        body = json.loads(msg.data) if msg.data else None
    except ValueError:
        body = None
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        c = detail.get("code")
        code = c if isinstance(c, int) and not isinstance(c, bool) else 0
        typ = detail.get("type") if isinstance(detail.get("type"), str) else ""
        message = detail.get("message") if isinstance(detail.get("message"), str) else ""
    if not code and code_h and code_h.strip().isdigit():
        code = int(code_h)
    return from_reply(
        code or 500,
        typ or "Error",
        message or header(msg, H_ERROR) or "",
        header(msg, H_NODE),
        header(msg, H_WORKER),
    )


def is_no_responders(msg: Msg) -> bool:
    """The server's answer to a request nobody listens to: status 503 with
    no body, never a node's 503, which has a body."""
    return not msg.data and header(msg, "Status") == "503"


def redact(servers: str | list[str]) -> str:
    """Server URLs without passwords or tokens, for error messages."""
    from urllib.parse import urlsplit, urlunsplit

    out = []
    for s in [servers] if isinstance(servers, str) else list(servers):
        for part in str(s).split(","):
            part = part.strip()
            u = urlsplit(part)
            if u.username is not None or u.password is not None:
                host = u.hostname or ""
                if u.port:
                    host += f":{u.port}"
                user = "xxxxx" if u.password is None else f"{u.username}:xxxxx"
                part = urlunsplit((u.scheme, f"{user}@{host}", u.path, u.query, u.fragment))
            out.append(part)
    return ",".join(out)


# ---------------------------------------------------------- the reply inbox


# Bytes of message data one call holds unread: a stream that produces
# faster than its caller reads would otherwise grow the client without end.
# Past it the call is abandoned (RemoteError, type SlowConsumer).
MAX_BUFFERED = 64 << 20

# What a call's queue yields once MAX_BUFFERED was passed.
_OVERFLOW: Any = object()


class _CallQueue(asyncio.Queue):  # type: ignore[type-arg]
    """A call's messages, counted in bytes; past MAX_BUFFERED it drops them
    and holds only _OVERFLOW."""

    def __init__(self) -> None:
        super().__init__()
        self.buffered = 0
        self.overflow = False

    def put_nowait(self, msg: Any) -> None:
        if self.overflow:
            return
        size = len(msg.data) if msg is not None and msg is not _OVERFLOW else 0
        if self.buffered + size > MAX_BUFFERED:
            self.overflow = True
            while not self.empty():
                super().get_nowait()
            self.buffered = 0
            super().put_nowait(_OVERFLOW)
            return
        self.buffered += size
        super().put_nowait(msg)

    def get_nowait(self) -> Any:
        msg = super().get_nowait()
        if msg is not None and msg is not _OVERFLOW:
            self.buffered -= len(msg.data)
        return msg


class _Inbox:
    """One wildcard subscription for the replies of every call: a call
    gets a token under it and a queue, instead of a subscription (and its
    SUB and UNSUB round trips) of its own."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._queues: dict[str, asyncio.Queue[Msg | None]] = {}
        self._next = 0
        self._sub: Any = None
        self.closed = False

    async def start(self) -> None:
        # A callback drains the subscription at once into the calls'
        # queues, so the byte limit only guards against a stuck loop.
        self._sub = await self._nc.subscribe(
            self._prefix + "*", cb=self._route, pending_msgs_limit=0, pending_bytes_limit=256 << 20
        )

    async def _route(self, msg: Msg) -> None:
        q = self._queues.get(msg.subject[len(self._prefix) :])
        if q is not None:
            q.put_nowait(msg)

    def open(self) -> tuple[str, str, asyncio.Queue[Msg | None]]:
        if self.closed:
            raise Unavailable("the client is closed", type="Closed")
        self._next += 1
        token = format(self._next, "x")
        q: asyncio.Queue[Msg | None] = _CallQueue()
        self._queues[token] = q
        return token, self._prefix + token, q

    def close(self, token: str) -> None:
        self._queues.pop(token, None)

    def fail_all(self) -> None:
        """Wakes every waiting call with None: the connection is gone."""
        self.closed = True
        for q in self._queues.values():
            q.put_nowait(None)


# ------------------------------------------------------------ one exchange


class _Exchange:
    """One request and its answer: heartbeats absorbed, chunks handed out,
    the last message (anything but a chunk) ends it."""

    def __init__(
        self,
        client: AsyncClient,
        subject: str,
        body: bytes,
        headers: dict[str, str],
        timeout: float,
        progress: Callable[[Any], None] | None = None,
    ) -> None:
        self._c = client
        self.subject = subject
        self._progress = progress
        self._reply = ""
        self._body = body
        self._headers = headers
        self.timeout = timeout
        self._token: str | None = None
        self._q: asyncio.Queue[Msg | None] | None = None
        self._deadline = 0.0
        self._heard = 0.0
        self.holder: str | None = None  # the node that sent a heartbeat
        self.done = False

    async def start(self) -> None:
        c = self._c
        inbox = c._inbox_or_raise()
        loop = asyncio.get_running_loop()
        self._token, reply, self._q = inbox.open()
        self._reply = reply
        h = dict(self._headers)
        h[H_TIMEOUT] = millis(self.timeout)
        if c.heartbeat:
            h[H_HEARTBEAT] = millis(c.heartbeat)
        if self._progress is not None:
            h[H_PROGRESS] = "1"
        try:
            await c._nc_or_raise().publish(self.subject, self._body, reply=reply, headers=h)
        except nats.errors.MaxPayloadError as exc:
            self.close()
            raise PayloadTooLarge(f"request to {self.subject}: {exc}", type="TooLarge") from None
        except nats.errors.ConnectionClosedError:
            self.close()
            raise Unavailable("the connection to NATS is closed", type="Closed") from None
        except BaseException:
            self.close()
            raise
        self._heard = loop.time()
        self._deadline = self._heard + self.timeout + reply_margin(self.timeout)

    async def next(self) -> Msg | None:
        """The next message of the answer; None once the last has come.
        Raises for a lost node, a passed deadline or a closed connection,
        never for an error reply (the caller reads it)."""
        if self.done:
            return None
        assert self._q is not None
        loop = asyncio.get_running_loop()
        hb = self._c.heartbeat
        while True:
            if self._q.empty():
                limit = self._deadline
                if hb:
                    limit = min(limit, self._heard + hb * LOSS_INTERVALS)
                try:
                    async with asyncio.timeout_at(limit):
                        msg = await self._q.get()
                except TimeoutError:
                    self.close()
                    raise self._silence(loop.time()) from None
            else:
                msg = self._q.get_nowait()
            if msg is None:
                self.close()
                raise Unavailable(
                    f"the connection to NATS closed while waiting for {self.subject}", type="Closed"
                )
            if msg is _OVERFLOW:
                self.close()
                raise RemoteError(
                    f"{self.subject}: more than {MAX_BUFFERED >> 20} MiB of the answer arrived unread "
                    "(a stream faster than its reader): the call is abandoned",
                    code=500,
                    type="SlowConsumer",
                )
            self._heard = loop.time()
            kind = header(msg, H_STREAM)
            if kind == "heartbeat":
                self.holder = header(msg, H_NODE) or self.holder
                continue
            if kind == "progress":
                if self._progress is not None:
                    self._progress(decode(msg.data, False))
                continue
            if is_no_responders(msg):
                self.close()
                raise Unavailable(f"no node serves {self.subject}", type="NoResponders")
            if kind != "chunk":
                self.close()
            return msg

    def _silence(self, now: float) -> RemoteError:
        if now >= self._deadline:
            return DeadlineExceeded(
                f"no answer from {self.subject} within {self.timeout:g} s",
                type="DeadlineExceeded",
                node=self.holder,
            )
        lost = self._c.heartbeat * LOSS_INTERVALS
        if self.holder is None:
            return Unavailable(
                f"no node took the call on {self.subject} within {lost:g} s "
                "(the node it reached may have died)",
                type="NoNode",
            )
        return WorkerLost(
            f"node {self.holder} stopped answering while it held the call "
            f"(no heartbeat for {lost:g} s): the call is lost",
            type="NodeLost",
            node=self.holder,
        )

    async def cancel(self) -> None:
        """Tells the node that runs the call that its caller gave up (the
        call's reply subject on <prefix>.cancel.call.<pool>, docs/protocol.md);
        it stops the call as at its deadline. Best effort: a call already
        answered, or a closed connection, is left alone."""
        if self.done or not self._reply:
            return
        c = self._c
        with contextlib.suppress(Exception):
            await c._nc_or_raise().publish(f"{c.prefix}.cancel.call.{c.pool}", self._reply.encode())

    def close(self) -> None:
        self.done = True
        if self._token is not None:
            inbox = self._c._inbox
            if inbox is not None:
                inbox.close(self._token)
            self._token = None


def _is_chunk(msg: Msg) -> bool:
    return header(msg, H_STREAM) == "chunk"


async def _answer(ex: _Exchange, raw: bool, pin: Callable[[str | None, bool], None] | None) -> Any:
    """Reads an exchange to its end: the value, or a streamed function's
    items as a list."""
    items: list[Any] = []
    streamed = False
    try:
        while True:
            try:
                msg = await ex.next()
            except BaseException:
                # A caller that gives up (task cancelled, KeyboardInterrupt
                # in the blocking Client, a progress callback that raised)
                # tells the node, which stops the work.
                await ex.cancel()
                raise
            if msg is None:  # pragma: no cover - next() returns the last message first
                return items
            err = reply_error(msg)
            if pin is not None:
                pin(header(msg, H_NODE), err is None or err.worker is not None)
            if err is not None:
                raise err
            if _is_chunk(msg):
                streamed = True
                items.append(decode(msg.data, raw))
                continue
            if streamed or header(msg, H_STREAM) == "end":
                return items
            return decode(msg.data, raw)
    finally:
        ex.close()


# ------------------------------------------------------------------ streams


class AsyncStream:
    """The items of a streamed call as they are produced: ``async for``.

    The request is sent at the first item (or on ``async with``). A plain
    function's one value is its one item. An error ends the iteration by
    raising it, after the items that came before.
    """

    def __init__(self, ex: _Exchange, raw: bool, pin: Callable[[str | None, bool], None] | None) -> None:
        self._ex = ex
        self._raw = raw
        self._pin = pin
        self._started = False
        self._ended = False
        self.node: str | None = None  # the node streaming, once it has answered

    async def start(self) -> AsyncStream:
        if not self._started:
            self._started = True
            await self._ex.start()
        return self

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Any:
        if self._ended:
            raise StopAsyncIteration
        await self.start()
        try:
            msg = await self._ex.next()
        except BaseException:
            self._ended = True
            await self._ex.cancel()  # no-op once the exchange closed itself
            raise
        if msg is None:
            self._ended = True
            raise StopAsyncIteration
        self.node = header(msg, H_NODE)
        err = reply_error(msg)
        if self._pin is not None:
            self._pin(self.node, err is None or err.worker is not None)
        if err is not None:
            self._ended = True
            raise err
        if _is_chunk(msg):
            return decode(msg.data, self._raw)
        self._ended = True
        if header(msg, H_STREAM) == "end":
            raise StopAsyncIteration
        # A function that does not stream: its value is the one item, and
        # the next __anext__ ends the iteration.
        return decode(msg.data, self._raw)

    async def aclose(self) -> None:
        """Stops listening; items still coming are dropped, and a stream
        still running is cancelled on its node."""
        self._ended = True
        await self._ex.cancel()
        self._ex.close()

    async def __aenter__(self) -> AsyncStream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # An abandoned iteration must not keep its queue in the inbox.
        self._ex.close()


# ----------------------------------------------------------------- sessions


class AsyncSession:
    """Calls that all reach the same worker: the first may reach any node
    of the pool, the following ones go to that node (docs/protocol.md,
    "Sessions"). Once the worker is gone, calls raise SessionLost."""

    def __init__(self, client: AsyncClient, key: str | None = None) -> None:
        self._c = client
        self.key = check_header("session key", key) if key is not None else secrets.token_hex(8)
        self.node: str | None = None  # the node that holds the session, once known

    def _pin(self, node: str | None, admitted: bool) -> None:
        # A session starts only with a call the node admitted (a worker
        # ran it): a 503 from a full node must not pin the next call there.
        if self.node is None and node and admitted:
            self.node = node

    def _subject(self, function: str) -> str:
        if self.node is None:
            return self._c._subject_req(function)
        return self._c._subject_node(self.node, function)

    async def call(
        self,
        function: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        raw: bool = False,
        request_id: str | None = None,
        progress: Callable[[Any], None] | None = None,
    ) -> Any:
        """As AsyncClient.call, on the session's worker."""
        ex = self._c._exchange(self._subject(function), payload, timeout, raw, self.key, request_id, progress)
        await ex.start()
        return await _answer(ex, raw, self._pin)

    def stream(
        self,
        function: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        raw: bool = False,
        request_id: str | None = None,
    ) -> AsyncStream:
        """As AsyncClient.stream, on the session's worker."""
        ex = self._c._exchange(self._subject(function), payload, timeout, raw, self.key, request_id)
        return AsyncStream(ex, raw, self._pin)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # The protocol has no end of session: the node forgets one unused
        # for an hour. Nothing to send.
        return None

    def __repr__(self) -> str:
        return f"AsyncSession(key={self.key!r}, node={self.node!r})"


# --------------------------------------------------------------------- jobs


class AsyncJob:
    """A job: its ``id`` (the Nats-Msg-Id), and ``await result()``."""

    def __init__(
        self,
        client: AsyncClient,
        job_id: str,
        function: str | None = None,
        raw: bool = False,
        duplicate: bool = False,
        seq: int | None = None,
        dead_from: tuple[str, int] | None = None,
    ) -> None:
        self._c = client
        self.id = job_id
        self.pool = client.pool
        self.function = function
        self.raw = raw
        self.duplicate = duplicate  # the stream had this id already: not queued again
        self.seq = seq  # the job's sequence in the jobs stream (a delayed job's: its schedule's)
        self.at: datetime | None = None  # when a delayed job is due
        self._dead_from = dead_from

    async def result(self, timeout: float | None = None) -> Any:
        """The job's stored result, waited for: its value, or the stored
        error raised (a job that failed for good, dead-lettered, included).
        ``timeout`` None waits as long as it takes; past it, TimeoutError
        (the job may still run: ask again later)."""
        if timeout is not None:
            check_timeout(timeout, 0)
        c = self._c
        js = c._js_or_raise()
        subject = f"{c.prefix}.result.{c.pool}.{self.id}"
        stream = await c._stream_for(subject, "results")
        q: asyncio.Queue[Msg] = asyncio.Queue()
        subs: list[Any] = []

        async def on_result(msg: Msg) -> None:
            q.put_nowait(msg)

        async def on_dead(msg: Msg) -> None:
            if header(msg, H_JOB_ID) == self.id:
                q.put_nowait(msg)

        try:
            # An ordered consumer from the first message finds a result
            # stored before it was created as well as one stored later.
            subs.append(
                await js.subscribe(
                    subject,
                    cb=on_result,
                    stream=stream,
                    ordered_consumer=True,
                    deliver_policy=jsapi.DeliverPolicy.ALL,
                )
            )
            # A node that cannot store a job's error as its result (the
            # results stream is full) still dead-letters it: then the dead
            # letter is the only word of how the job ended
            # (cmd/submit/job.go, deadWatch).
            dead = self._dead_from or await c._dead_position(self.function)
            if dead is not None:
                dead_stream, start = dead
                dead_subject = f"{c.prefix}.dead.{c.pool}.{self.function or '*'}"
                subs.append(
                    await js.subscribe(
                        dead_subject,
                        cb=on_dead,
                        stream=dead_stream,
                        ordered_consumer=True,
                        config=jsapi.ConsumerConfig(
                            deliver_policy=jsapi.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
                        ),
                    )
                )
            try:
                async with asyncio.timeout(timeout):
                    msg = await q.get()
            except TimeoutError:
                raise TimeoutError(f"no result for job {self.id} within {timeout:g} s") from None
        finally:
            for sub in subs:
                try:
                    await sub.unsubscribe()
                except Exception:  # noqa: BLE001 - the connection may be gone; nothing to undo then
                    pass
        err = reply_error(msg)
        if err is not None:
            raise err
        return decode(msg.data, self.raw)

    async def info(self) -> dict[str, Any]:
        """The job's status as a dict: ``state``, ``attempts``, ``node``,
        ``worker``, ``submitted``/``started``/``finished``/``updated``
        (RFC 3339), ``error`` (the last one: code, type, message) and
        ``progress``. NotFound (type NoStatus) when the status bucket has no
        word of the job: unknown, or older than it keeps."""
        kv = await self._c._status_kv()
        try:
            entry = await kv.get(status_key(self.pool, self.id))
        except jserrors.KeyNotFoundError:
            raise NotFound(
                f"no status for job {self.id} in pool {self.pool}: unknown, or older than the status bucket keeps",
                type="NoStatus",
            ) from None
        info: dict[str, Any] = json.loads(entry.value or b"{}")
        return info

    async def cancel(self) -> bool:
        """Cancels the job: one no node took yet never runs, a running one is
        stopped (an async function is cancelled; a sync one's worker is
        replaced unless it returns within the node's grace), and
        ``result()`` then raises ``pyfleet.Cancelled``. False, and nothing
        changed, when the job had already ended (see ``status()``).
        NotFound (type NoStatus) for a job without a status."""
        c = self._c
        kv = await c._status_kv()
        key = status_key(self.pool, self.id)
        while True:
            try:
                entry = await kv.get(key)
            except jserrors.KeyNotFoundError:
                raise NotFound(
                    f"no status for job {self.id} in pool {self.pool}, so it cannot be cancelled: "
                    "unknown, or older than the status bucket keeps",
                    type="NoStatus",
                ) from None
            st = json.loads(entry.value or b"{}")
            if st.get("state") in FINAL_STATES:
                return False
            was = st.get("state")
            now = _now()
            st.update(state="cancelled", finished=now, updated=now,
                      error={"code": 499, "type": "Cancelled", "message": "the job was cancelled"})
            try:
                await kv.update(key, json.dumps(st, separators=(",", ":")).encode(), last=entry.revision)
                break
            except jserrors.KeyWrongLastSequenceError:
                continue  # a node wrote meanwhile: look again
        # A delayed job fires now, for a node to settle it as cancelled.
        if was == "scheduled":
            await _schedule.fire_cancelled(c, self.id)
        # The status says cancelled from now on, so a node that has not
        # started the job never will; the one running it learns here.
        nc = c._nc_or_raise()
        await nc.publish(f"{c.prefix}.cancel.job.{self.pool}.{self.id}", b"")
        await nc.flush()
        return True

    async def status(self) -> str:
        """The job's state: pending, scheduled, running, retrying, done,
        failed, dead or cancelled."""
        return str((await self.info()).get("state"))

    async def progress(self) -> Any:
        """The last progress value the job's function reported, or None."""
        return (await self.info()).get("progress")

    def __repr__(self) -> str:
        return f"AsyncJob(id={self.id!r}, pool={self.pool!r}, function={self.function!r})"


# ------------------------------------------------------------------- events


class AsyncEvents:
    """Lifecycle events as dicts, live: ``async for ev in c.events()``.

    Listening starts at ``async with`` (or the first item); events
    published before are not seen. With a timeout, the iteration ends once
    it has passed.
    """

    def __init__(self, client: AsyncClient, subject: str, timeout: float | None) -> None:
        self._c = client
        self.subject = subject
        self._timeout = timeout
        self._q: asyncio.Queue[Msg | None] = asyncio.Queue()
        self._sub: Any = None
        self._end: float | None = None
        self._closed = False

    async def start(self) -> AsyncEvents:
        if self._sub is None and not self._closed:
            nc = self._c._nc_or_raise()
            # Events come in bursts (a node starting N workers); a small
            # pending limit would drop exactly the moments worth watching.
            self._sub = await nc.subscribe(
                self.subject, cb=self._on, pending_msgs_limit=0, pending_bytes_limit=64 << 20
            )
            await nc.flush()
            if self._timeout is not None:
                self._end = asyncio.get_running_loop().time() + self._timeout
        return self

    async def _on(self, msg: Msg) -> None:
        self._q.put_nowait(msg)

    def __aiter__(self) -> AsyncEvents:
        return self

    async def __anext__(self) -> dict[str, Any]:
        await self.start()
        while not self._closed:
            try:
                async with asyncio.timeout_at(self._end):
                    msg = await self._q.get()
            except TimeoutError:
                break
            if msg is None:
                break
            try:
                ev = json.loads(msg.data)
            except ValueError:
                continue  # one bad message must not end a watch
            if isinstance(ev, dict):
                return ev
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._closed = True
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - a closed connection has no subscription left
                pass

    async def __aenter__(self) -> AsyncEvents:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ------------------------------------------------------------------- client


class AsyncClient:
    """A pyfleet client on one NATS connection, for asyncio.

    ``servers`` is a URL or a list of them; NATS connection options
    (``user``, ``password``, ``token``, ``user_credentials`` or ``creds``,
    ``tls``, ``tls_hostname``, ``nkeys_seed``, ...) pass through to
    nats-py's ``connect``, which also handles reconnects; ``connect_wait``
    bounds the first connection (Unavailable after it). ``timeout`` is
    the default deadline of a call, ``heartbeat`` the interval of the
    heartbeats each call asks for (None: none; a call whose node dies then
    waits for its deadline).
    """

    def __init__(
        self,
        servers: str | list[str] = DEFAULT_SERVERS,
        pool: str = "default",
        prefix: str = "pyfleet",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat: float | None = DEFAULT_HEARTBEAT,
        name: str = "pyfleet client",
        creds: str | None = None,
        connect_wait: float = 5.0,
        **connect_options: Any,
    ) -> None:
        if isinstance(servers, str):
            if not servers.strip():
                raise ValueError("servers: no NATS server URL")
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        else:
            servers = list(servers)
            if not servers:
                raise ValueError("servers: no NATS server URL")
        self.servers = servers
        self.pool = check_token("pool", pool)
        self.prefix = check_prefix(prefix)
        self.timeout = check_timeout(timeout, DEFAULT_TIMEOUT)
        if heartbeat is not None and heartbeat != 0:
            if not isinstance(heartbeat, (int, float)) or not 0.1 <= heartbeat <= 3600:
                raise ValueError(f"heartbeat must be between 0.1 and 3600 seconds (or None), got {heartbeat!r}")
        self.heartbeat = float(heartbeat) if heartbeat else None
        self.connect_wait = check_timeout(connect_wait, 5.0)
        if creds is not None:
            connect_options.setdefault("user_credentials", creds)
        self._options = {"name": name, **connect_options}
        self._nc: NATS | None = None
        self._js: Any = None
        self._inbox: _Inbox | None = None
        self._streams: dict[tuple[str, str], str] = {}
        self._status: Any = None  # the jobs' status bucket, once found

    # -- connection

    async def connect(self) -> AsyncClient:
        """Connects to NATS; ``async with`` does it."""
        if self._nc is not None:
            return self
        options = dict(self._options)
        user_closed = options.pop("closed_cb", None)

        async def closed() -> None:
            if self._inbox is not None:
                self._inbox.fail_all()
            if user_closed is not None:
                await user_closed()

        async def quiet(err: Exception) -> None:
            # nats-py's default logs every failed attempt with a traceback.
            _log.warning("nats: %s", err or type(err).__name__)

        options.setdefault("error_cb", quiet)
        nc = NATS()
        try:
            # nats-py retries a first connection as it would a lost one
            # (max_reconnect_attempts times, reconnect_time_wait apart):
            # minutes by default. A client that cannot reach NATS says so
            # after connect_wait instead.
            await asyncio.wait_for(nc.connect(servers=self.servers, closed_cb=closed, **options), self.connect_wait)
        except (nats.errors.NoServersError, OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            reason = str(exc) or str(nc.last_error or "") or type(exc).__name__
            raise Unavailable(
                f"cannot connect to NATS at {redact(self.servers)}: {reason}", type="NoServers"
            ) from exc
        inbox = _Inbox(nc)
        await inbox.start()
        self._nc, self._inbox, self._js = nc, inbox, nc.jetstream(timeout=JS_TIMEOUT)
        return self

    async def close(self) -> None:
        """Closes the connection; calls still waiting raise Unavailable."""
        nc, self._nc = self._nc, None
        if self._inbox is not None:
            self._inbox.fail_all()
        if nc is not None and not nc.is_closed:
            await nc.close()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _nc_or_raise(self) -> NATS:
        if self._nc is None:
            raise RuntimeError("the client is not connected: use `async with` or `await client.connect()`")
        return self._nc

    def _inbox_or_raise(self) -> _Inbox:
        self._nc_or_raise()
        assert self._inbox is not None
        return self._inbox

    def _js_or_raise(self) -> Any:
        self._nc_or_raise()
        return self._js

    # -- subjects

    def _subject_req(self, function: str) -> str:
        return f"{self.prefix}.req.{self.pool}.{check_token('function', function)}"

    def _subject_node(self, node: str, function: str) -> str:
        return f"{self.prefix}.node.{check_token('node', node)}.{self.pool}.{check_token('function', function)}"

    def _exchange(
        self,
        subject: str,
        payload: Any,
        timeout: float | None,
        raw: bool,
        session: str | None,
        request_id: str | None,
        progress: Callable[[Any], None] | None = None,
    ) -> _Exchange:
        headers: dict[str, str] = {}
        if session is not None:
            headers[H_SESSION] = session
        if request_id is not None:
            headers[H_REQUEST_ID] = check_header("request_id", request_id)
        return _Exchange(
            self, subject, encode(payload, raw), headers, check_timeout(timeout, self.timeout), progress
        )

    # -- calls

    async def call(
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
        out, or bytes with raw=True. A streamed function's items come back
        as one list. ``node`` sends the call to that node only. Raises the
        RemoteError subclass of the answer's code. ``progress`` is called
        with each value the function passes to ``ctx.progress``, as it
        comes. Cancelling the task tells the node, which stops the call."""
        subject = self._subject_node(node, function) if node else self._subject_req(function)
        ex = self._exchange(subject, payload, timeout, raw, None, request_id, progress)
        await ex.start()
        return await _answer(ex, raw, None)

    def stream(
        self,
        function: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        raw: bool = False,
        node: str | None = None,
        request_id: str | None = None,
    ) -> AsyncStream:
        """The items of a generator function as they are produced:
        ``async for item in c.stream(...)``. ``timeout`` bounds the whole
        stream."""
        subject = self._subject_node(node, function) if node else self._subject_req(function)
        return AsyncStream(self._exchange(subject, payload, timeout, raw, None, request_id), raw, None)

    def session(self, key: str | None = None) -> AsyncSession:
        """A session (``async with c.session() as s``): its calls all reach
        the worker that took the first. ``key`` defaults to a random one."""
        return AsyncSession(self, key)

    # -- jobs

    async def submit(
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
    ) -> AsyncJob:
        """Submits a job (JetStream) and returns its handle; ``job_id``
        (default: 16 random hex digits) is the Nats-Msg-Id, so the same id
        submitted again within two minutes is not queued again
        (``job.duplicate``). ``timeout`` is the job's deadline in seconds,
        counted from its start (default: the node's ``--job-timeout``, one
        hour; never the client's call timeout). ``delay`` (seconds) or
        ``at`` (a datetime; naive means local time) makes the job due
        later: its status is ``scheduled`` until then and the NATS server
        (>= 2.12) keeps it, so it fires even if every node was down.
        ``priority`` is "high", "normal" or "low": nodes fetch the waiting
        high jobs first and the low ones last (docs/protocol.md,
        "Priorities")."""
        check_token("function", function)
        suffix = job_priority_suffix(priority)
        job_id = secrets.token_hex(8) if job_id is None else check_token("job_id", job_id)
        body = encode(payload, raw)
        headers = {H_MSG_ID: job_id}
        if reply_to is not None:
            headers[H_REPLY_TO] = check_header("reply_to", reply_to)
        if timeout is not None:
            headers[H_TIMEOUT] = millis(check_timeout(timeout, 0))
        if session is not None:
            headers[H_SESSION] = check_header("session", session)
        if request_id is not None:
            headers[H_REQUEST_ID] = check_header("request_id", request_id)
        js = self._js_or_raise()
        # Where dead letters stand before the job exists, so that its own
        # is found and an earlier one of the same id is not.
        dead = await self._dead_position(function)
        subject = f"{self.prefix}.job.{self.pool}.{function}{suffix}"
        due = _schedule.due_time(job_id, delay, at)
        if due is not None:
            subject = _schedule.delay_headers(self, subject, job_id, due, headers)
        try:
            ack = await js.publish(subject, body, timeout=JS_TIMEOUT, headers=headers)
        except jserrors.NoStreamResponseError:
            await self._explain_no_jetstream()
            raise Unavailable(
                f"no stream stores {subject}: is a poolnode running?", type="NoStream"
            ) from None
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(f"job for {subject}: {exc}", type="TooLarge") from None
        except jserrors.APIError as exc:
            if exc.err_code == _schedule.ERR_SCHEDULES_DISABLED:
                raise _schedule.schedules_disabled(self) from None
            raise
        except nats.errors.TimeoutError:
            raise Unavailable(
                f"no acknowledgement of the job from JetStream within {JS_TIMEOUT:g} s", type="NoAck"
            ) from None
        if not ack.duplicate:
            await self._set_pending(job_id, function, ack.seq, "pending" if due is None else "scheduled")
        job = AsyncJob(self, job_id, function, raw, bool(ack.duplicate), ack.seq, dead)
        job.at = due
        return job

    async def _status_kv(self) -> Any:
        """The jobs' status bucket, which the nodes create."""
        if self._status is not None:
            return self._status
        name = status_bucket(self.prefix)
        try:
            self._status = await self._js_or_raise().key_value(name)
        except jserrors.BucketNotFoundError:
            raise Unavailable(f"no {name} bucket: is a poolnode of this version running?", type="NoStream") from None
        except (nats.errors.NoRespondersError, jserrors.ServiceUnavailableError, nats.errors.TimeoutError):
            await self._explain_no_jetstream()
            raise Unavailable(f"no {name} bucket: is a poolnode running?", type="NoStream") from None
        return self._status

    async def _set_pending(self, job_id: str, function: str, seq: int, state: str = "pending") -> None:
        """Records a job just queued as pending, unless a node wrote its
        status first or a later submission of the id did; best effort, as
        the Go client's (client/status.go)."""
        try:
            kv = await self._status_kv()
        except Unavailable:
            return
        key = status_key(self.pool, job_id)
        for _ in range(8):
            rev = 0
            try:
                entry = await kv.get(key)
                st = json.loads(entry.value or b"{}")
                if st.get("seq", 0) >= seq:
                    return
                rev = entry.revision or 0
            except jserrors.KeyNotFoundError:
                pass
            except (jserrors.Error, nats.errors.Error, ValueError):
                return
            now = _now()
            value = json.dumps(
                {"id": job_id, "pool": self.pool, "function": function, "seq": seq, "state": state,
                 "attempts": 0, "submitted": now, "updated": now},
                separators=(",", ":"),
            ).encode()
            try:
                if rev:
                    await kv.update(key, value, last=rev)
                else:
                    await kv.create(key, value)
                return
            except jserrors.KeyWrongLastSequenceError:
                continue  # a node wrote meanwhile: look again
            except (jserrors.Error, nats.errors.Error):
                return

    async def schedule(
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
        """Runs ``function`` with ``payload`` on ``cron``, each time as a job
        of its own (id ``<name>-<sequence>``), until ``unschedule(name)``; a
        schedule of that name is replaced. ``cron``: 5 fields (minute
        first), 6 (seconds first), ``@every <duration>`` (at least 1s) or
        @hourly, @daily, @weekly, @monthly, @yearly; in UTC. The NATS
        server (>= 2.12) keeps and fires it, with or without a node running.
        ValueError for a cron this client can tell is wrong, BadRequest for
        one the server refuses."""
        return await _schedule.schedule(self, name, cron, function, payload, raw, timeout, reply_to)

    async def schedules(self) -> list[dict[str, Any]]:
        """The pool's recurring schedules, by name: name, cron, pattern (as
        the server has it), function, payload, created, seq."""
        return await _schedule.schedules(self)

    async def unschedule(self, name: str) -> bool:
        """Removes the schedule ``name`` (a job it fired already runs);
        False when there was none."""
        return await _schedule.unschedule(self, name)

    def job(self, job_id: str, *, raw: bool = False, function: str | None = None) -> AsyncJob:
        """A handle for a job submitted elsewhere, by its id. Knowing the
        function narrows the dead letters watched to that function's."""
        if function is not None:
            check_token("function", function)
        return AsyncJob(self, check_token("job_id", job_id), function, raw)

    async def _stream_for(self, subject: str, kind: str) -> str:
        """The stream that stores subject, looked up once per kind and pool
        by subject, so another prefix needs no naming convention."""
        key = (kind, self.pool)
        name = self._streams.get(key)
        if name is not None:
            return name
        js = self._js_or_raise()
        want = f"{self.prefix.replace('.', '_').upper()}_{kind.upper()}"
        try:
            name = await js.find_stream_name_by_subject(subject)
        except jserrors.NotFoundError:
            raise Unavailable(f"no {want} stream: is a poolnode running?", type="NoStream") from None
        except (nats.errors.NoRespondersError, jserrors.ServiceUnavailableError, nats.errors.TimeoutError):
            await self._explain_no_jetstream()
            raise Unavailable(f"no {want} stream: is a poolnode running?", type="NoStream") from None
        self._streams[key] = name
        return name

    async def _dead_position(self, function: str | None) -> tuple[str, int] | None:
        """The dead letters' stream and its next sequence, or None if it
        cannot be had: the result alone is waited for then."""
        subject = f"{self.prefix}.dead.{self.pool}.{function or '_'}"
        try:
            name = await self._stream_for(subject, "dead")
            info = await self._js_or_raise().stream_info(name)
        except (Unavailable, jserrors.Error, nats.errors.Error):
            return None
        return name, info.state.last_seq + 1

    async def _explain_no_jetstream(self) -> None:
        """Raises Unavailable naming the cause when the server has no
        JetStream at all (nats-server's default), which "no stream" would hide."""
        try:
            await self._js_or_raise().account_info()
        except (nats.errors.NoRespondersError, jserrors.ServiceUnavailableError):
            raise Unavailable(
                "the NATS server has no JetStream, so jobs are unavailable "
                "(start it with -js; calls work without JetStream)",
                type="NoJetStream",
            ) from None
        except (jserrors.Error, nats.errors.Error):
            return

    # -- nodes and events

    async def nodes(
        self, pool: str | None = None, *, wait: float = 0.5, detail: bool = False
    ) -> list[dict[str, Any]]:
        """The nodes that answer within ``wait`` seconds, as dicts: node,
        pool, id, version, containment, workers, busy, queued, handled,
        errors, started, uptime_s (a figure the node did not report is
        None). ``pool`` None: the client's pool; "*": every pool.

        ``detail=True`` also asks each node for its status
        (docs/protocol.md, "Node status") and adds it as ``detail``: its
        workers one by one (name, pid as the host numbers it, state, age_s,
        handled, rss_bytes, last_event) and per-function figures (calls,
        errors by code, rate, p50_ms, p99_ms over the last minute); None for
        a node whose status did not come in time."""
        if pool is not None and pool != "*":
            check_token("pool", pool)
        pool = self.pool if pool is None else pool
        wait = check_timeout(wait, 0.5)
        if detail:
            stats, statuses = await asyncio.gather(
                self._collect("STATS", wait),
                self._collect_subject(f"{self.prefix}.status", wait, key=("pool", "node")),
            )
        else:
            stats, statuses = await self._collect("STATS", wait), []
        by_node = {(st.get("pool"), st.get("node")): st for st in statuses}
        now = datetime.now(timezone.utc)
        rows = []
        for s in stats:
            meta = s.get("metadata") or {}
            if meta.get("prefix") and meta["prefix"] != self.prefix:
                continue  # a fleet under another prefix shares the service name
            row = _node_row(s, now)
            if detail:
                row["detail"] = by_node.get((row["pool"], row["node"]))
            if pool == "*" or row["pool"] == pool:
                rows.append(row)
        rows.sort(key=lambda r: (r["pool"], r["node"], r["id"]))
        return rows

    async def functions(
        self, pool: str | None = None, *, wait: float = 0.5
    ) -> list[dict[str, Any]]:
        """The functions the nodes of ``pool`` (None: the client's) serve,
        from the micro INFO of those that answer within ``wait`` seconds,
        sorted by name, as dicts: name, pool, raw, stream, input_schema and
        output_schema (the JSON Schemas of the body it takes and the value
        it returns, None where the node published none), rate_limit ("100/s",
        None for none) and nodes."""
        if pool is not None:
            check_token("pool", pool)
        pool = self.pool if pool is None else pool
        wait = check_timeout(wait, 0.5)
        by_name: dict[str, dict[str, Any]] = {}
        for info in await self._collect("INFO", wait):
            meta = info.get("metadata") or {}
            if meta.get("prefix") and meta["prefix"] != self.prefix:
                continue  # a fleet under another prefix shares the service name
            if meta.get("pool") != pool:
                continue
            node = meta.get("node") or info.get("id")
            for ep in info.get("endpoints") or []:
                em = (ep.get("metadata") if isinstance(ep, dict) else None) or {}
                name = em.get("function")
                if not name or name == "*":
                    continue
                # Nodes of a pool run one app; the first to answer describes it.
                f = by_name.setdefault(name, {
                    "name": name,
                    "pool": pool,
                    "raw": em.get("raw") == "true",
                    "stream": em.get("stream") == "true",
                    "input_schema": _schema(em.get("input_schema")),
                    "output_schema": _schema(em.get("output_schema")),
                    "rate_limit": em.get("rate_limit"),
                    "nodes": [],
                })
                if node not in f["nodes"]:
                    f["nodes"].append(node)
        for f in by_name.values():
            f["nodes"].sort()
        return [by_name[n] for n in sorted(by_name)]

    async def _collect(self, verb: str, wait: float) -> list[dict[str, Any]]:
        """The answers to $SRV.<verb>.pyfleet that arrive within wait
        seconds, one per service instance."""
        return await self._collect_subject(f"$SRV.{verb}.{SERVICE_NAME}", wait, key=("id",))

    async def _collect_subject(
        self, subject: str, wait: float, *, key: tuple[str, ...]
    ) -> list[dict[str, Any]]:
        """The JSON objects answering a request to subject that arrive
        within wait seconds, one per value of the fields ``key``."""
        inbox = self._inbox_or_raise()
        token, reply, q = inbox.open()
        answers: list[dict[str, Any]] = []
        seen: set[tuple[Any, ...]] = set()
        try:
            await self._nc_or_raise().publish(subject, b"", reply=reply)
            end = asyncio.get_running_loop().time() + wait
            while True:
                try:
                    async with asyncio.timeout_at(end):
                        msg = await q.get()
                except TimeoutError:
                    break
                if msg is None:
                    raise Unavailable("the connection to NATS closed", type="Closed")
                if is_no_responders(msg):
                    break
                try:
                    a = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(a, dict) or not all(a.get(k) for k in key):
                    continue
                k = tuple(a[k] for k in key)
                if k in seen:
                    continue
                seen.add(k)
                answers.append(a)
        finally:
            inbox.close(token)
        return answers

    def events(
        self,
        timeout: float | None = None,
        *,
        pool: str | None = None,
        node: str | None = None,
        kind: str | None = None,
    ) -> AsyncEvents:
        """Lifecycle events (docs/protocol.md, "Events") as dicts, live,
        for ``timeout`` seconds (None: until you stop). ``pool`` None: the
        client's pool, "*": every pool; ``node`` and ``kind`` narrow."""
        if timeout is not None:
            check_timeout(timeout, 0)
        tokens = []
        for what, v, default in (("pool", pool, self.pool), ("node", node, "*"), ("kind", kind, "*")):
            if v is None:
                v = default
            elif v != "*":
                check_token(what, v)
            tokens.append(v)
        return AsyncEvents(self, f"{self.prefix}.evt.{'.'.join(tokens)}", timeout)

    def __repr__(self) -> str:
        return f"AsyncClient({redact(self.servers)!r}, pool={self.pool!r}, prefix={self.prefix!r})"


_LOAD_KEYS = ("workers", "busy", "queued", "handled", "errors")


def _schema(text: Any) -> Any:
    """A published schema, decoded; None if absent or not JSON."""
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _node_row(s: dict[str, Any], now: datetime) -> dict[str, Any]:
    """One node as `submit nodes --json` shows it (cmd/submit/nodes.go)."""
    meta = s.get("metadata") or {}
    row: dict[str, Any] = {
        "node": meta.get("node") or s.get("id"),
        "pool": meta.get("pool", ""),
        "id": s.get("id"),
        "version": s.get("version"),
        "containment": meta.get("containment"),
        **{k: None for k in _LOAD_KEYS},
        "started": s.get("started"),
        "uptime_s": None,
    }
    started = s.get("started")
    if isinstance(started, str):
        try:
            t = datetime.fromisoformat(started.replace("Z", "+00:00"))
            row["uptime_s"] = round((now - t).total_seconds())
        except ValueError:
            pass
    endpoints = s.get("endpoints") or []
    # Every endpoint carries the same node-wide figures: take one, never add them up.
    for e in endpoints:
        data = e.get("data") if isinstance(e, dict) else None
        load = data.get("node") if isinstance(data, dict) else None
        if isinstance(load, dict) and _int(load.get("workers")) is not None:
            for k in _LOAD_KEYS:
                row[k] = _int(load.get(k))
            return row
    handled = errors = 0
    for e in endpoints:
        if not isinstance(e, dict):
            continue
        data = e.get("data") if isinstance(e.get("data"), dict) else {}
        if _int(data.get("completed")) is not None and _int(data.get("errors")) is not None:
            handled += data["completed"]
            errors += data["errors"]
        else:
            handled += _int(e.get("num_requests")) or 0
            errors += _int(e.get("num_errors")) or 0
    row["handled"], row["errors"] = handled, errors
    return row
