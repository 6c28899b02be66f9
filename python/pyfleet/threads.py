"""The call threads: where sync functions and generators run when calls may
come more than one at a time."""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

# Call threads are named so: the fork hooks and the exit (pyfleet/process.py)
# tell them from the app's threads by the name.
CALL_THREAD_PREFIX = "pyfleet-call"


def is_call_thread(thread: threading.Thread) -> bool:
    return thread.name.startswith(CALL_THREAD_PREFIX)


class CallThreads:
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
