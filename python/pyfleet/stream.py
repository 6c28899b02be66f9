"""One Batches stream: the node's calls in, their frames out."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import threading
from collections import deque
from collections.abc import Callable

import grpc

from . import codec
from .app import FunctionSpec
from .calls import call_async, call_sync, invoke, runs_inline
from .codec import Call, Result, ResultBatch
from .context import Context
from .threads import CallThreads

# Chunks that one stream's generators (sync ones, and async ones, each) may
# have queued but not yet written. Beyond it they wait, so a fast generator
# and a slow reader cannot fill memory.
CHUNK_WINDOW = 256
# A message whose calls produce no result this soon is answered with an
# empty ResultBatch: the node holds frames back while the worker is busy
# with its last message (to send them together), and this tells it the
# worker is free to read again (its calls are long ones).
ACK_AFTER_S = 0.0002
# A ResultBatch holds frames up to about this many payload bytes (and at
# least one frame): batching is for small frames, and the node's limit on a
# message must hold for the batch, not only for each frame.
BATCH_BYTES = 1 << 20

# A frame for the writer and what to run once it is written (a generator's
# room in the window); None for the frame ends the stream.
_Out = tuple[Result | None, Callable[[], None] | None]


class Stream:
    """A reader task starts every call as its own task (or thread job, or at
    once on the loop: see _start), and results reach the single writer
    through a queue. The writer sends all the frames queued when it wakes as
    one message: Python's gRPC costs far more per message than per byte, so
    frames that are ready together go together."""

    def __init__(
        self, functions: dict[str, FunctionSpec], calls: CallThreads, concurrency: int
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._functions = functions
        self._calls = calls
        self._threads = concurrency
        # With one call at a time, a sync function runs on the loop itself.
        self._inline = runs_inline(concurrency, "sync")
        self._out: deque[_Out] = deque()
        # The writer's, while it waits for the queue to fill.
        self._wake: asyncio.Future[None] | None = None
        self._writes = 0  # messages written
        # Write an empty ResultBatch, even with no frames. The first message
        # is one: the node's dial waits for it (pool/worker.go, awaitGreeting).
        self._ack = True
        self._tasks: dict[int, asyncio.Task[Result]] = {}
        # The contexts of the calls in flight that take one, by call id.
        self._contexts: dict[int, Context] = {}
        self._loop_thread = threading.get_ident()
        self._cancel_reasons: dict[int, str] = {}
        # The deadlines (loop time) of the async calls running, and one
        # timer for the earliest: a timer armed and cancelled for every
        # call cost ~3 us of the worker's ~50 us a call at 64 in flight
        # (test/bench/notes.md).
        self._deadlines: dict[int, float] = {}
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._pending = 0  # calls started whose END is not queued yet
        self._eof = False
        self._draining = False
        self._closed = False
        self._thread_room = threading.Semaphore(CHUNK_WINDOW)
        self._task_room = asyncio.Semaphore(CHUNK_WINDOW)

    def _put(self, item: _Out) -> None:
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
        """Serves the stream until the node closes it and every call has
        ended, or drain() ends it, or it breaks."""
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
                    await write(ResultBatch(results=frames))
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
        # Frames are read with context.read(), not the request iterator: one
        # layer less per call.
        read = context.read
        try:
            while True:
                message = await read()
                if message is grpc.aio.EOF:
                    break
                for call in message.calls:
                    if call.cancel:
                        self._cancel(call.id, "Cancelled")
                    else:
                        self._start(call)
                self._loop.call_later(ACK_AFTER_S, self._ack_if_silent, self._writes)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The stream broke under us: nothing more can be written either.
            sys.stderr.write(f"pyfleet: Batches stream failed: {exc!r}\n")
            self._put((None, None))
            return
        # The node closed its side: finish what runs, then end the stream.
        self._eof = True
        self._finish_if_idle()

    def _start(self, call: Call) -> None:
        self._pending += 1
        if self._draining:
            self._end(codec.shutting_down(call))
            return
        spec = self._functions.get(call.function)
        if spec is None:
            self._end(codec.unknown_function(call))
            return
        kind = spec.kind
        ctx = None
        if spec.context is not None:
            ctx = Context(call, functools.partial(self._ctx_frame, call), self._schedule)
            self._contexts[call.id] = ctx
        if kind == "sync":
            if self._inline and ctx is None:
                # The loop waits for the call: with one call at a time,
                # nothing else of this worker would run meanwhile anyway.
                # The handshake says so ("inline"), so that the node does
                # not count failed health checks during such a call; it
                # kills the worker if the call overruns its deadline.
                self._end(call_sync(call, spec))
            else:
                self._calls.submit(self._run_sync, call, spec, ctx)
        elif kind == "gen":
            self._calls.submit(self._run_gen, call, spec, ctx)
        else:
            runner = call_async if kind == "async" else self._run_asyncgen
            task = self._loop.create_task(runner(call, spec, ctx))
            self._tasks[call.id] = task
            if call.timeout_ms:
                self._add_deadline(call.id, self._loop.time() + call.timeout_ms / 1000)
            task.add_done_callback(functools.partial(self._task_done, call, spec))

    def _add_deadline(self, call_id: int, at: float) -> None:
        self._deadlines[call_id] = at
        timer = self._deadline_timer
        if timer is None or at < timer.when():
            if timer is not None:
                timer.cancel()
            self._deadline_timer = self._loop.call_at(at, self._deadlines_due)

    def _deadlines_due(self) -> None:
        """Cancels the calls past their deadline, and arms the timer for the
        next one. A call that ended took its deadline with it."""
        self._deadline_timer = None
        now = self._loop.time()
        for call_id in [c for c, at in self._deadlines.items() if at <= now]:
            del self._deadlines[call_id]
            self._cancel(call_id, "DeadlineExceeded")
        if self._deadlines:
            self._deadline_timer = self._loop.call_at(
                min(self._deadlines.values()), self._deadlines_due
            )

    def _ctx_frame(self, call: Call, kind: str, payload: bytes, level: str) -> None:
        """A context's sink: one PROGRESS or LOG frame of call, from any
        thread. A call thread posts it, in order with the END frame it
        posts later; the loop queues it at once."""
        frame = Result(
            id=call.id,
            kind=Result.PROGRESS if kind == "progress" else Result.LOG,
            payload=payload,
            level=level,
            request_id=call.request_id if kind == "log" else "",
        )
        if threading.get_ident() == self._loop_thread:
            self._put((frame, None))
        else:
            self._calls.post(self._put, (frame, None))

    def _schedule(self, delay: float, callback: Callable[[], None]) -> None:
        """A context's timer: callback on the loop after delay, from any thread."""
        if threading.get_ident() == self._loop_thread:
            self._loop.call_later(delay, callback)
        else:
            self._loop.call_soon_threadsafe(self._loop.call_later, delay, callback)

    def _end(self, frame: Result) -> None:
        """Queue the one END frame of a call (on the loop thread)."""
        ctx = self._contexts.pop(frame.id, None)
        if ctx is not None:
            ctx.end()  # its last progress value goes before the END
        self._put((frame, None))
        self._pending -= 1
        self._finish_if_idle()

    def _finish_if_idle(self) -> None:
        if self._pending == 0 and (self._eof or self._draining):
            self._put((None, None))

    def _cancel(self, call_id: int, reason: str) -> None:
        ctx = self._contexts.get(call_id)
        if ctx is not None:
            ctx.cancel()  # what a sync function that polls ctx.cancelled sees
        task = self._tasks.get(call_id)
        # Sync calls are not in _tasks: a thread cannot be interrupted, and
        # the node kills the worker if one overruns its deadline too far.
        if task is not None and not task.done():
            self._cancel_reasons.setdefault(call_id, reason)
            task.cancel()

    def _task_done(self, call: Call, spec: FunctionSpec, task: asyncio.Task[Result]) -> None:
        # A done callback runs exactly once, even for a task cancelled before
        # it started, so this is where an async call gets its one END frame.
        self._deadlines.pop(call.id, None)
        self._tasks.pop(call.id, None)
        reason = self._cancel_reasons.pop(call.id, "Cancelled")
        if task.cancelled():
            self._end(codec.stopped(call, spec, reason))
        else:
            self._end(task.result())

    def _close(self) -> None:
        self._closed = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        for call_id in list(self._tasks):
            self._cancel(call_id, "Cancelled")
        # Wake generator threads waiting for room; each sees _closed and stops.
        self._thread_room.release(self._threads)

    # The runners catch BaseException so that every call ends with one END
    # frame, even if the function calls sys.exit().

    def _run_sync(self, call: Call, spec: FunctionSpec, ctx: Context | None) -> None:
        self._calls.post(self._end, call_sync(call, spec, ctx))

    def _run_gen(self, call: Call, spec: FunctionSpec, ctx: Context | None) -> None:
        post = self._calls.post
        put = self._put
        room = self._thread_room
        try:
            with contextlib.closing(invoke(call, spec, ctx)) as gen:
                for item in gen:
                    chunk = codec.chunk(call, spec, item)
                    room.acquire()
                    if self._closed:
                        break
                    # Posted in order, before the END.
                    post(put, (chunk, room.release))
            frame = Result(id=call.id)
        except BaseException as exc:
            frame = codec.failure(call, spec, exc)
        post(self._end, frame)

    async def _run_asyncgen(self, call: Call, spec: FunctionSpec, ctx: Context | None) -> Result:
        room = self._task_room
        put = self._put
        try:
            async with contextlib.aclosing(invoke(call, spec, ctx)) as agen:
                async for item in agen:
                    chunk = codec.chunk(call, spec, item)
                    await room.acquire()
                    put((chunk, room.release))
            return Result(id=call.id)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            return codec.failure(call, spec, exc)
