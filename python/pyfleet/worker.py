"""The pyfleet worker process: serves an App's functions to one poolnode over gRPC.

Started by poolnode, never by hand:

    python -m pyfleet.worker --app MODULE[:ATTR] --app-dir DIR --socket PATH \\
        --worker-id ID --concurrency N [--stop-grace SECONDS]

Environment: PYFLEET_WORKER_SECRET_FD (required: the read end of a pipe that
holds the secret every RPC must carry, and nothing else; read to EOF and
closed at start, so that neither /proc/<pid>/environ nor any child shows the
secret) and PYFLEET_WORKER_LIFELINE_FD (the read end of a pipe whose write end
only the node holds).

Stdout protocol, one line each:
    PYFLEET-READY {"v":1,"pid":...,"functions":[{"name":...,"raw":...,"stream":...,"inline":...}]}
    PYFLEET-ERROR {"type":...,"message":...}   (the app failed to import; exit 3)
Every other stdout and stderr line is the app's, and the node logs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import io
import json
import os
import signal
import stat
import sys
import threading
import time
import traceback
from _operator import _compare_digest  # hmac.compare_digest, without importing hashlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

# gRPC's fork handlers cannot pause its poller thread ("Other threads are
# currently calling into gRPC, skipping fork() handlers") and only log noise
# when a function forks; forked children never use the worker's gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_health.v1.health import aio as health_aio  # noqa: E402

from . import App, BadRequest, FunctionSpec  # noqa: E402
from ._proto import worker_pb2, worker_pb2_grpc  # noqa: E402

SERVICE_NAME = "pyfleet.worker.v1.Worker"
SECRET_FD_ENV = "PYFLEET_WORKER_SECRET_FD"
LIFELINE_ENV = "PYFLEET_WORKER_LIFELINE_FD"
SECRET_METADATA = "pyfleet-secret"
# The node's secret is 64 hex digits; more than this on the pipe is not one.
MAX_SECRET_BYTES = 1024

EXIT_USAGE = 2
EXIT_IMPORT = 3

# How long in-flight calls may finish after SIGTERM, unless --stop-grace
# says otherwise. The node kills the worker after its own grace anyway, so
# this only bounds a worker whose node stopped watching.
STOP_GRACE_S = 30.0
# Chunks that one stream's generators (sync ones, and async ones, each) may
# have queued but not yet written. Beyond it they wait, so a fast generator
# and a slow reader cannot fill memory.
CHUNK_WINDOW = 256
# On Batches, a message whose calls produce no result this soon is answered
# with an empty ResultBatch: the node holds frames back while the worker is
# busy with its last message (to send them together), and this tells it the
# worker is free to read again (its calls are long ones).
ACK_AFTER_S = 0.0002
# A ResultBatch holds frames up to about this many payload bytes (and at
# least one frame): batching is for small frames, and the node's limit on a
# message must hold for the batch, not only for each frame.
BATCH_BYTES = 1 << 20
# The node enforces its own limit (413); this one only has to be above it.
MAX_MESSAGE_BYTES = 64 << 20

CALL_THREAD_PREFIX = "pyfleet-call"
PR_SET_PDEATHSIG = 1

Result = worker_pb2.Result
ResultBatch = worker_pb2.ResultBatch
Error = worker_pb2.Error
CHUNK = worker_pb2.Result.CHUNK

# Built once: json.dumps with arguments builds a new encoder on every call.
# allow_nan=False because NaN and Infinity are not JSON to other languages.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _not_json(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


# parse_constant is called for NaN and (-)Infinity only, so refusing them
# costs ordinary payloads nothing.
_decode_json = json.JSONDecoder(parse_constant=_not_json).decode


# ---------------------------------------------------------------- one call


def _decode(spec: FunctionSpec, payload: bytes) -> Any:
    """The function's argument: a payload that cannot be decoded is the
    caller's fault (400), never a 500 with a traceback.

    The node refuses such payloads first, by one rule (checkJSON in
    bus/validate.go: nesting over 64 levels, numbers beyond a float64,
    integers over 4300 digits, text that is not UTF-8, lone surrogates);
    this is the same promise kept here should one get through."""
    if spec.raw:
        return payload
    if not payload:
        # An empty body (a call with no arguments) reads as JSON null.
        return None
    try:
        return _decode_json(payload.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer over sys.get_int_max_str_digits();
        # RecursionError: nesting deeper than the interpreter's stack.
        raise BadRequest(f"JSON not accepted: {exc}") from None


def _encode(spec: FunctionSpec, value: Any, what: str = "return value") -> bytes:
    if spec.raw:
        if isinstance(value, bytes):
            return value
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        raise TypeError(
            f"{what} of raw function {spec.name!r} must be bytes, not {type(value).__name__}"
        )
    try:
        return _encode_json(value).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{what} of {spec.name!r} is not JSON-serialisable: {exc}") from None


def _error(call_id: int, code: int, typ: str, message: str) -> Result:
    return Result(id=call_id, error=Error(code=code, type=typ, message=message))


def _failure(call: worker_pb2.Call, spec: FunctionSpec, exc: BaseException) -> Result:
    """The END frame for a function that raised; 500s log their traceback."""
    if isinstance(exc, BadRequest):
        return _error(call.id, 400, type(exc).__name__, str(exc))
    # One write, so that tracebacks of concurrent calls do not interleave.
    sys.stderr.write(
        f"pyfleet: {spec.name} raised (call {call.id}, request {call.request_id or '-'}):\n"
        + "".join(traceback.format_exception(exc))
    )
    return _error(call.id, 500, type(exc).__name__, str(exc))


# The runners catch BaseException so that every call ends with one END frame,
# even if the function calls sys.exit().


def _call_sync(call: worker_pb2.Call, spec: FunctionSpec) -> Result:
    try:
        return Result(id=call.id, payload=_encode(spec, spec.fn(_decode(spec, call.payload))))
    except BaseException as exc:
        return _failure(call, spec, exc)


async def _call_async(call: worker_pb2.Call, spec: FunctionSpec) -> Result:
    try:
        value = await spec.fn(_decode(spec, call.payload))
        return Result(id=call.id, payload=_encode(spec, value))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return _failure(call, spec, exc)


# ---------------------------------------------------------------- call threads


def _inline(concurrency: int, kind: str) -> bool:
    """Whether a function of this kind runs on the event loop itself rather
    than on a call thread: a sync one, when calls come one at a time."""
    return concurrency == 1 and kind == "sync"


class _CallThreads:
    """Runs sync calls (and generators) on up to `size` threads, waking as
    few threads as it can.

    A thread pool that hands each call to a thread and each result back to
    the loop pays a wake-up, a context switch and a change of GIL holder
    every time, and for a short function that costs many times the call.
    Here one awake thread takes queued calls one after another for as long
    as there are any, and results reach the loop in bursts, one wake-up per
    burst. When the calls it runs take a while (they sleep, wait for I/O or
    compute), the loop's check sees every awake thread busy on one call for
    STUCK_S and wakes more, so up to `size` calls still run at once: a call
    waits at most about STUCK_S for a free thread while fewer than `size`
    are busy."""

    STUCK_S = 0.002

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self._loop = loop
        self._size = size
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._jobs: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._threads: list[threading.Thread] = []
        self._awake = 0  # threads taking jobs (or told to)
        self._idle = 0  # threads waiting for a job
        self._busy_since: dict[int, float] = {}  # thread ident -> its call's start
        self._check_armed = False
        self._done: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._posted = False
        self._shutdown = False

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Queue fn(*args) for a thread (on the loop thread)."""
        with self._lock:
            if self._shutdown:
                return
            self._jobs.append((fn, args))
            if self._awake == 0 or self._all_stuck(time.monotonic()):
                self._wake_one()
            if not self._check_armed:
                self._check_armed = True
                self._loop.call_later(self.STUCK_S, self._check)

    def _wake_one(self) -> bool:
        # With the lock held.
        if self._idle:
            self._idle -= 1
            self._awake += 1
            self._cond.notify()
            return True
        if len(self._threads) < self._size:
            self._awake += 1
            thread = threading.Thread(
                target=self._work,
                name=f"{CALL_THREAD_PREFIX}_{len(self._threads)}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()
            return True
        return False

    def _all_stuck(self, now: float) -> bool:
        """Whether every awake thread is in a call begun STUCK_S ago or more
        (with the lock held)."""
        busy = self._busy_since
        return self._awake <= len(busy) and all(
            now - since >= self.STUCK_S for since in busy.values()
        )

    def _check(self) -> None:
        """Wakes more threads while queued calls wait behind busy ones."""
        now = time.monotonic()
        with self._lock:
            self._check_armed = False
            if not self._jobs or self._shutdown:
                return
            if self._all_stuck(now):
                for _ in range(len(self._jobs)):
                    if not self._wake_one():
                        break
            self._check_armed = True
            self._loop.call_later(self.STUCK_S, self._check)

    def _work(self) -> None:
        me = threading.get_ident()
        jobs = self._jobs
        lock = self._lock
        clock = time.monotonic
        while True:
            with lock:
                self._busy_since.pop(me, None)
                while not jobs:
                    if self._shutdown:
                        self._awake -= 1
                        return
                    self._awake -= 1
                    self._idle += 1
                    self._cond.wait()  # whoever notifies counts us awake
                fn, args = jobs.popleft()
                self._busy_since[me] = clock()
            try:
                fn(*args)  # the runners catch what the function raises
            except BaseException:  # a bug here must not cost the thread
                traceback.print_exc()

    def post(self, callback: Callable[..., None], *args: Any) -> None:
        """Runs callback(*args) on the loop (from a call thread), in order
        with everything else posted; one wake-up of the loop per burst."""
        with self._lock:
            self._done.append((callback, args))
            if self._posted:
                return
            self._posted = True
        self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._posted = False
        for callback, args in done:
            try:
                callback(*args)
            except BaseException:  # one failure must not drop the others
                traceback.print_exc()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on a call thread; its result. fn must not raise."""
        future: asyncio.Future[Any] = self._loop.create_future()

        def settle(result: Any) -> None:
            if not future.done():  # the caller may have gone
                future.set_result(result)

        def job() -> None:
            self.post(settle, fn(*args))

        self.submit(job)
        return await future

    def shutdown(self) -> None:
        """Drops queued calls; idle threads end, busy ones after their call."""
        with self._lock:
            self._shutdown = True
            self._jobs.clear()
            self._cond.notify_all()


# ---------------------------------------------------------------- one stream


class _Stream:
    """One Batches (or Serve) stream: a reader task starts every call as its
    own task (or thread job, or at once on the loop: see _start), and results
    reach the single writer through a queue. On Batches the writer sends all
    the frames queued when it wakes as one message: Python's gRPC costs far
    more per message than per byte, so frames that are ready together go
    together."""

    def __init__(
        self,
        functions: dict[str, FunctionSpec],
        calls: _CallThreads,
        concurrency: int,
        batched: bool,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._functions = functions
        self._calls = calls
        self._threads = concurrency
        self._batched = batched
        # With one call at a time, a sync function runs on the loop itself:
        # handing it to a thread and back costs more than most calls.
        self._inline = _inline(concurrency, "sync")
        # (frame, release): release() runs once the frame is written; None
        # for the frame ends the stream. _wake is the writer's, while it
        # waits for the queue to fill.
        self._out: deque[tuple[Result | None, Callable[[], None] | None]] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._writes = 0  # messages written
        self._ack = False  # write an empty ResultBatch, even with no frames
        self._tasks: dict[int, asyncio.Task[Result]] = {}
        self._cancel_reasons: dict[int, str] = {}
        self._pending = 0  # calls started whose END is not queued yet
        self._eof = False
        self._draining = False
        self._closed = False
        self._thread_room = threading.Semaphore(CHUNK_WINDOW)
        self._task_room = asyncio.Semaphore(CHUNK_WINDOW)

    def _put(self, item: tuple[Result | None, Callable[[], None] | None]) -> None:
        """Queue a frame for the writer (on the loop thread)."""
        self._out.append(item)
        self._wake_writer()

    def _wake_writer(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            if not wake.done():
                wake.set_result(None)

    def _ack_if_silent(self, writes: int) -> None:
        """Tells the node the worker reads again, if nothing has since."""
        if self._writes == writes and not self._out:
            self._ack = True
            self._wake_writer()

    async def run(self, context: grpc.aio.ServicerContext) -> None:
        reader = asyncio.create_task(self._read(context))
        try:
            out = self._out
            write = context.write
            while True:
                if not out and not self._ack:
                    self._wake = self._loop.create_future()
                    await self._wake
                frames: list[Result] = []
                releases: list[Callable[[], None]] = []
                end = False
                size = 0
                while out and size < BATCH_BYTES:
                    frame, release = out.popleft()
                    if frame is None:
                        end = True
                        break
                    frames.append(frame)
                    size += len(frame.payload)
                    if release is not None:
                        releases.append(release)
                if self._ack and not frames:
                    self._writes += 1
                    await write(ResultBatch())
                self._ack = False
                if frames:
                    self._writes += 1
                    if self._batched:
                        await write(ResultBatch(results=frames))
                    else:
                        for frame in frames:
                            await write(frame)
                    for release in releases:
                        release()
                if end:
                    return
        finally:
            reader.cancel()
            self._close()

    def drain(self) -> None:
        """Refuse new calls; end the stream once the calls in flight have ended."""
        self._draining = True
        self._finish_if_idle()

    async def _read(self, context: grpc.aio.ServicerContext) -> None:
        read = context.read
        try:
            while True:
                message = await read()
                if message is grpc.aio.EOF:
                    break
                for call in message.calls if self._batched else (message,):
                    if call.cancel:
                        self._cancel(call.id, "Cancelled")
                    else:
                        self._start(call)
                if self._batched:
                    self._loop.call_later(ACK_AFTER_S, self._ack_if_silent, self._writes)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The stream broke under us: nothing more can be written either.
            sys.stderr.write(f"pyfleet: Serve stream failed: {exc!r}\n")
            self._put((None, None))
            return
        # The node closed its side: finish what runs, then end the stream.
        self._eof = True
        self._finish_if_idle()

    def _start(self, call: worker_pb2.Call) -> None:
        self._pending += 1
        if self._draining:
            self._end(_error(call.id, 503, "Unavailable", "worker is shutting down"))
            return
        spec = self._functions.get(call.function)
        if spec is None:
            self._end(_error(call.id, 404, "NotFound", f"no function named {call.function!r}"))
            return
        kind = spec.kind
        if kind == "sync":
            if self._inline:
                # The loop waits for the call: with one call at a time,
                # nothing else of this worker would run meanwhile anyway.
                # The handshake says so ("inline"), so that the node does
                # not count failed health checks during such a call; it
                # kills the worker if the call overruns its deadline.
                self._end(_call_sync(call, spec))
            else:
                self._calls.submit(self._run_sync, call, spec)
        elif kind == "gen":
            self._calls.submit(self._run_gen, call, spec)
        else:
            runner = _call_async if kind == "async" else self._run_asyncgen
            task = self._loop.create_task(runner(call, spec))
            self._tasks[call.id] = task
            timer = None
            if call.timeout_ms:
                timer = self._loop.call_later(
                    call.timeout_ms / 1000, self._cancel, call.id, "DeadlineExceeded"
                )
            task.add_done_callback(functools.partial(self._task_done, call, spec, timer))

    def _end(self, frame: Result) -> None:
        """Queue the one END frame of a call (on the loop thread)."""
        self._put((frame, None))
        self._pending -= 1
        self._finish_if_idle()

    def _finish_if_idle(self) -> None:
        if self._pending == 0 and (self._eof or self._draining):
            self._put((None, None))

    def _cancel(self, call_id: int, reason: str) -> None:
        task = self._tasks.get(call_id)
        # Sync calls are not in _tasks: a thread cannot be interrupted, and
        # the node kills the worker if one overruns its deadline too far.
        if task is not None and not task.done():
            self._cancel_reasons.setdefault(call_id, reason)
            task.cancel()

    def _task_done(
        self,
        call: worker_pb2.Call,
        spec: FunctionSpec,
        timer: asyncio.TimerHandle | None,
        task: asyncio.Task[Result],
    ) -> None:
        # A done callback runs exactly once, even for a task cancelled before
        # it started, so this is where an async call gets its one END frame.
        if timer is not None:
            timer.cancel()
        self._tasks.pop(call.id, None)
        reason = self._cancel_reasons.pop(call.id, "Cancelled")
        if task.cancelled():
            if reason == "DeadlineExceeded":
                message = f"{spec.name} passed its deadline of {call.timeout_ms} ms"
            else:
                message = f"{spec.name} was cancelled"
            self._end(_error(call.id, 408, reason, message))
        else:
            self._end(task.result())

    def _close(self) -> None:
        self._closed = True
        for call_id in list(self._tasks):
            self._cancel(call_id, "Cancelled")
        # Wake generator threads waiting for room; each sees _closed and stops.
        self._thread_room.release(self._threads)

    # The runners catch BaseException so that every call ends with one END
    # frame, even if the function calls sys.exit().

    def _run_sync(self, call: worker_pb2.Call, spec: FunctionSpec) -> None:
        self._calls.post(self._end, _call_sync(call, spec))

    def _run_gen(self, call: worker_pb2.Call, spec: FunctionSpec) -> None:
        post = self._calls.post
        put = self._put
        room = self._thread_room
        try:
            with contextlib.closing(spec.fn(_decode(spec, call.payload))) as gen:
                for item in gen:
                    chunk = Result(
                        id=call.id, kind=CHUNK, payload=_encode(spec, item, "yielded value")
                    )
                    room.acquire()
                    if self._closed:
                        break
                    # Posted in order, before the END.
                    post(put, (chunk, room.release))
            frame = Result(id=call.id)
        except BaseException as exc:
            frame = _failure(call, spec, exc)
        post(self._end, frame)

    async def _run_asyncgen(self, call: worker_pb2.Call, spec: FunctionSpec) -> Result:
        room = self._task_room
        put = self._put
        try:
            async with contextlib.aclosing(spec.fn(_decode(spec, call.payload))) as agen:
                async for item in agen:
                    chunk = Result(
                        id=call.id, kind=CHUNK, payload=_encode(spec, item, "yielded value")
                    )
                    await room.acquire()
                    put((chunk, room.release))
            return Result(id=call.id)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            return _failure(call, spec, exc)


class _Servicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, app: App, calls: _CallThreads, threads: int) -> None:
        self._functions = dict(app.functions)
        self._calls = calls
        self._threads = threads
        self._streams: set[_Stream] = set()
        self._draining = False

    async def Batches(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await self._serve(context, batched=True)

    async def Serve(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await self._serve(context, batched=False)

    async def _serve(self, context: grpc.aio.ServicerContext, batched: bool) -> None:
        # Frames are read with context.read() in _Stream, not request_iterator:
        # one layer less per call.
        stream = _Stream(self._functions, self._calls, self._threads, batched)
        self._streams.add(stream)
        if self._draining:
            stream.drain()
        try:
            await stream.run(context)
        finally:
            self._streams.discard(stream)

    async def Unary(self, call: worker_pb2.Call, context: grpc.aio.ServicerContext) -> Result:
        # One call per RPC: the benchmark's direct ceiling (make bench). It
        # runs the function the way a Serve stream does, without streaming.
        if self._draining:
            return _error(call.id, 503, "Unavailable", "worker is shutting down")
        spec = self._functions.get(call.function)
        if spec is None:
            return _error(call.id, 404, "NotFound", f"no function named {call.function!r}")
        if spec.stream:
            return _error(call.id, 400, "BadRequest", f"{spec.name} streams: call it on Serve")
        if spec.kind == "sync":
            if _inline(self._threads, spec.kind):
                return _call_sync(call, spec)  # as a stream runs it: see _Stream._start
            result: Result = await self._calls.call(_call_sync, call, spec)
            return result
        try:
            timeout = call.timeout_ms / 1000 if call.timeout_ms else None
            return await asyncio.wait_for(_call_async(call, spec), timeout)
        except TimeoutError:
            message = f"{spec.name} passed its deadline of {call.timeout_ms} ms"
            return _error(call.id, 408, "DeadlineExceeded", message)

    def drain(self) -> None:
        self._draining = True
        for stream in list(self._streams):
            stream.drain()


class _SecretCheck(grpc.aio.ServerInterceptor):
    """Refuses every RPC, health checks included, without the node's secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing pyfleet-secret")

        # A streaming handler never waits for a request message, so it can
        # refuse a call of any shape at once.
        self._deny = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == SECRET_METADATA:
                if isinstance(value, str):
                    value = value.encode()
                if _compare_digest(value, self._secret):
                    return await continuation(handler_call_details)
                break
        return self._deny


# ---------------------------------------------------------------- process


class _LineTracker:
    """Stands in for sys.stdout while the app imports, to know whether the app
    left a line unfinished (the handshake must start a line of its own)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _load_app(spec: str, app_dir: str) -> App:
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    sys.path.insert(0, os.path.abspath(app_dir))
    module = importlib.import_module(module_name)
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(app, App):
        raise TypeError(f"{module_name}:{attr} is a {type(app).__name__}, not a pyfleet.App")
    return app


def _read_secret(value: str) -> str:
    """Reads the secret from the pipe fd `value` names, to EOF (the node
    closed its end before the fork), and closes the fd: a child the app
    starts inherits neither the secret nor a way to read it."""
    fd = int(value)
    if fd < 3:
        raise ValueError("not a pipe of its own (0, 1 and 2 are stdin, stdout and stderr)")
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ValueError("not a pipe")
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
            if len(data) > MAX_SECRET_BYTES:
                raise ValueError(f"more than {MAX_SECRET_BYTES} bytes")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    secret = data.decode("ascii").strip()
    if not secret:
        raise ValueError("the pipe held no secret")
    return secret


def _start_lifeline(fd: int) -> None:
    """The node holds the write end of this pipe. When it dies the read
    returns EOF and the worker kills its whole process group: itself and
    everything it started that did not leave the group."""

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass  # the node never writes; anything it might is ignored
        except OSError:
            pass
        # Take the group only if we lead it: otherwise it belongs to
        # someone else (a shell, a test runner, the node itself).
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    os.set_inheritable(fd, False)
    threading.Thread(target=watch, name="pyfleet-lifeline", daemon=True).start()


def _die_with_parent_after_fork() -> None:
    """Processes forked from the worker (os.fork, multiprocessing) get
    PR_SET_PDEATHSIG, so they die with the process that forked them.

    Linux sends that signal when the forking *thread* exits, so it is set only
    for forks from threads that live as long as the process: the main thread
    and the call threads. subprocess does not run these hooks; its children
    are covered by the lifeline's group kill.

    ctypes is loaded at the first fork, in the parent: most workers never
    fork, and every worker start pays for what it imports."""
    if not sys.platform.startswith("linux"):
        return
    parent: dict[str, Any] = {"pid": 0, "long_lived": False, "prctl": None}

    def before() -> None:
        thread = threading.current_thread()
        parent["pid"] = os.getpid()
        parent["long_lived"] = thread is threading.main_thread() or thread.name.startswith(
            CALL_THREAD_PREFIX
        )
        if parent["long_lived"] and parent["prctl"] is None:
            try:
                import ctypes

                parent["prctl"] = ctypes.CDLL(None, use_errno=True).prctl
            except (OSError, AttributeError):
                parent["prctl"] = False  # no prctl after all

    def after_in_child() -> None:
        prctl = parent["prctl"]
        if not parent["long_lived"] or not prctl:
            return
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent["pid"]:
            os._exit(1)  # the parent died before the signal was armed

    os.register_at_fork(before=before, after_in_child=after_in_child)


def _handshake(app: App, concurrency: int) -> str:
    # inline: the function runs on the event loop, which answers nothing
    # else meanwhile (see _Stream._start), so the node must not take the
    # silence for a hang.
    functions = [
        {
            "name": spec.name,
            "raw": spec.raw,
            "stream": spec.stream,
            "inline": _inline(concurrency, spec.kind),
        }
        for spec in app.functions.values()
    ]
    body = {"v": 1, "pid": os.getpid(), "functions": functions}
    return "PYFLEET-READY " + json.dumps(body, separators=(",", ":"))


async def _serve(app: App, args: argparse.Namespace, secret: str, at_line_start: bool) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(0)  # a second signal: stop now, without the grace
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    socket_path: str = args.socket
    concurrency: int = args.concurrency
    calls = _CallThreads(loop, concurrency)
    server = grpc.aio.server(
        interceptors=[_SecretCheck(secret)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # No bandwidth-delay probes: each is a ping frame that costs
            # this process about as much as a message, on a Unix socket
            # where the node sets fixed windows anyway.
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    servicer = _Servicer(app, calls, concurrency)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)

    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            os.unlink(socket_path)  # left by an earlier worker with this id
    old_umask = os.umask(0o177)  # the socket file is created 0600
    try:
        server.add_insecure_port("unix:" + socket_path)
    finally:
        os.umask(old_umask)
    await server.start()

    sys.stdout.write(("" if at_line_start else "\n") + _handshake(app, concurrency) + "\n")
    sys.stdout.flush()

    await stop.wait()
    await health.enter_graceful_shutdown()
    servicer.drain()
    # Returns once every stream has drained (or after the grace, cancelling
    # what is left).
    await server.stop(args.stop_grace)
    calls.shutdown()
    return 0


def _exit_if_threads_stuck(code: int) -> None:
    """A sync call still running after the grace would hold the interpreter's
    exit (it joins the call threads) for as long as the call runs."""
    threads = [t for t in threading.enumerate() if t.name.startswith(CALL_THREAD_PREFIX)]
    for thread in threads:
        thread.join(0.5)  # idle ones end at once: the call threads are shut down
    if any(thread.is_alive() for thread in threads):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pyfleet.worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--app", required=True, help="MODULE[:ATTR], ATTR defaults to app")
    parser.add_argument("--app-dir", default=".", help="put first on sys.path")
    parser.add_argument("--socket", required=True, help="Unix socket path to serve on")
    parser.add_argument("--worker-id", default="", help="the node's name for this worker")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight at once")
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=STOP_GRACE_S,
        metavar="SECONDS",
        help="how long calls may finish after SIGTERM",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.stop_grace < 0:
        parser.error("--stop-grace must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # Popped: children the app starts get no stale fd number.
    secret_fd = os.environ.pop(SECRET_FD_ENV, "")
    if not secret_fd:
        print(f"pyfleet worker: {SECRET_FD_ENV} is not set", file=sys.stderr)
        return EXIT_USAGE
    try:
        secret = _read_secret(secret_fd)
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        print(f"pyfleet worker: bad {SECRET_FD_ENV}={secret_fd!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The node logs stdout line by line: the app's prints must not wait in a buffer.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)

    # Armed before the app imports: a slow import must not outlive the node.
    lifeline = os.environ.get(LIFELINE_ENV)
    if lifeline:
        try:
            fd = int(lifeline)
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise ValueError("not a pipe")
        except (ValueError, OSError) as exc:
            # Watching the wrong fd would read EOF and kill the group at once.
            print(f"pyfleet worker: bad {LIFELINE_ENV}={lifeline!r}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        _start_lifeline(fd)
    _die_with_parent_after_fork()

    stdout = sys.stdout
    tracker = _LineTracker(stdout)
    sys.stdout = tracker
    try:
        app = _load_app(args.app, args.app_dir)
    except BaseException as exc:
        traceback.print_exc()
        error = {"type": type(exc).__name__, "message": str(exc)}
        line = "PYFLEET-ERROR " + json.dumps(error, separators=(",", ":"))
        stdout.write(("" if tracker.at_line_start else "\n") + line + "\n")
        stdout.flush()
        return EXIT_IMPORT
    finally:
        if sys.stdout is tracker:
            sys.stdout = stdout

    code = asyncio.run(_serve(app, args, secret, tracker.at_line_start))
    _exit_if_threads_stuck(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
