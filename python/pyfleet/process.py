"""Process plumbing: the secret on its pipe, the lifeline, dying with the
parent, signals, loading the app and the stdout handshake."""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import functools
import importlib
import json
import os
import signal
import stat
import sys
import threading
import traceback
from typing import Any, TextIO

from .app import App, FunctionSpec
from .calls import runs_inline
from .threads import is_call_thread

SECRET_FD_ENV = "PYFLEET_WORKER_SECRET_FD"
LIFELINE_ENV = "PYFLEET_WORKER_LIFELINE_FD"
# The node's secret is 64 hex digits; more than this on the pipe is not one.
MAX_SECRET_BYTES = 1024
PR_SET_PDEATHSIG = 1
# The most bytes of JSON Schema in the PYFLEET-READY line: what is left of
# the node's 64 KiB line limit (lifecycle/spawn.go) covers the rest of it
# for hundreds of functions. Schemas past it are left out.
HANDSHAKE_SCHEMA_BUDGET = 40 << 10
# The worker protocol the READY line's "v" names; the node refuses any other
# (pool/handshake.go). 2: the stream opens with an empty ResultBatch.
PROTOCOL_VERSION = 2


class UsageError(Exception):
    """The node started the worker wrongly (the message says how)."""


class AppImportFailed(Exception):
    """The app did not load; the PYFLEET-ERROR line is written."""


# ---------------------------------------------------------------- secret


def take_secret() -> str:
    """The secret on the pipe SECRET_FD_ENV names. The variable is popped:
    children the app starts get no stale fd number."""
    value = os.environ.pop(SECRET_FD_ENV, "")
    if not value:
        raise UsageError(f"{SECRET_FD_ENV} is not set")
    try:
        return read_secret(value)
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"bad {SECRET_FD_ENV}={value!r}: {exc}") from None


def read_secret(value: str) -> str:
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


# ---------------------------------------------------------------- dying with the node


def arm_lifeline() -> None:
    """Watches the pipe LIFELINE_ENV names, if set. Armed before the app
    imports: a slow import must not outlive the node."""
    value = os.environ.get(LIFELINE_ENV)
    if not value:
        return
    try:
        fd = int(value)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ValueError("not a pipe")
    except (ValueError, OSError) as exc:
        # Watching the wrong fd would read EOF and kill the group at once.
        raise UsageError(f"bad {LIFELINE_ENV}={value!r}: {exc}") from None
    start_lifeline(fd)


def start_lifeline(fd: int) -> None:
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
    # A bare thread: threading.Thread's start waits for the thread to run,
    # and cost a forked worker twice as much (~0.4 ms against ~0.2;
    # test/bench/notes.md). Nothing joins it; it ends with the process.
    _thread.start_new_thread(watch, ())


def die_with_parent_after_fork() -> None:
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
    # The forking thread's signal mask before the fork (per thread: call
    # threads may fork at once).
    masks = threading.local()
    stops = {signal.SIGTERM, signal.SIGINT}

    def before() -> None:
        # Held until the child has its own handlers (after_in_child): a
        # SIGTERM sent to it right after the fork stays pending until then,
        # rather than reaching the worker's handler through the shared
        # wakeup socket.
        masks.saved = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        thread = threading.current_thread()
        parent["pid"] = os.getpid()
        parent["long_lived"] = thread is threading.main_thread() or is_call_thread(thread)
        if parent["long_lived"] and parent["prctl"] is None:
            try:
                import ctypes

                parent["prctl"] = ctypes.CDLL(None, use_errno=True).prctl
            except (OSError, AttributeError):
                parent["prctl"] = False  # no prctl after all

    def after_in_child() -> None:
        # The worker's SIGTERM and SIGINT handlers (stop_on_signals) are the
        # event loop's: the C handler writes the signal to the loop's wakeup
        # socket, which a forked child shares with the worker. A child that
        # got SIGTERM (multiprocessing's Pool.terminate sends it to every
        # pool process) would so stop the worker itself. A forked child
        # starts with the handlers a fresh interpreter has.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, masks.saved)
        prctl = parent["prctl"]
        if not parent["long_lived"] or not prctl:
            return
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent["pid"]:
            os._exit(1)  # the parent died before the signal was armed

    def after_in_parent() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, masks.saved)

    os.register_at_fork(before=before, after_in_parent=after_in_parent, after_in_child=after_in_child)


# ---------------------------------------------------------------- signals and exit


def stop_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event the first SIGTERM or SIGINT sets; a second one exits at
    once, without the grace."""
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(0)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    return stop


def exit_if_threads_stuck(code: int) -> None:
    """A sync call still running after the grace would hold the interpreter's
    exit (it joins the call threads) for as long as the call runs."""
    threads = [t for t in threading.enumerate() if is_call_thread(t)]
    for thread in threads:
        thread.join(0.5)  # idle ones end at once: the call threads are shut down
    if any(thread.is_alive() for thread in threads):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ---------------------------------------------------------------- the app and the handshake
#
# Stdout protocol, one line each, at the start of a line:
#     PYFLEET-READY {"v":2,"pid":...,"functions":[{"name":...,"raw":...,"stream":...,"inline":...}]}
#     PYFLEET-ERROR {"type":...,"message":...}   (the app failed to import)
# Every other stdout and stderr line is the app's, and the node logs it
# (pool/worker.go reads the handshake).


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


def _write_line(stdout: TextIO, line: str, at_line_start: bool) -> None:
    stdout.write(("" if at_line_start else "\n") + line + "\n")
    stdout.flush()


def import_app(spec: str, app_dir: str) -> tuple[App, bool]:
    """The App that spec (MODULE[:ATTR]) names, and whether its import left
    stdout at the start of a line. If it fails to load, the traceback goes
    to stderr, the PYFLEET-ERROR line to stdout, and AppImportFailed is
    raised."""
    stdout = sys.stdout
    tracker = _LineTracker(stdout)
    sys.stdout = tracker
    try:
        app = _load_app(spec, app_dir)
    except BaseException as exc:
        traceback.print_exc()
        error = {"type": type(exc).__name__, "message": str(exc)}
        line = "PYFLEET-ERROR " + json.dumps(error, separators=(",", ":"))
        _write_line(stdout, line, tracker.at_line_start)
        raise AppImportFailed from None
    finally:
        if sys.stdout is tracker:
            sys.stdout = stdout
    return app, tracker.at_line_start


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


def announce_ready(app: App, concurrency: int, at_line_start: bool) -> None:
    """Writes the PYFLEET-READY line: the node may dial now."""
    # inline: the function runs on the event loop, which answers nothing
    # else meanwhile (see Stream._start), so the node must not take the
    # silence for a hang. It is the one field that depends on the worker's
    # arguments; the rest was described once (describe_functions).
    functions = ",".join(
        ('{"inline":true,' if runs_inline(concurrency, spec.kind, spec.context is not None) else '{"inline":false,')
        + described[1:]
        for spec, described in describe_functions(app)
    )
    line = f'PYFLEET-READY {{"v":{PROTOCOL_VERSION},"pid":{os.getpid()},"functions":[{functions}]}}'
    _write_line(sys.stdout, line, at_line_start)


@functools.cache
def describe_functions(app: App) -> list[tuple[FunctionSpec, str]]:
    """Each function of app with the JSON object its PYFLEET-READY entry is,
    all but "inline". Cached (an app's functions are fixed once it is
    imported): a preloaded template calls it once after the import, so
    that its forked workers only join the strings. Described in each
    worker, the schemas and the first use of json cost ~1 ms of page faults
    a worker (test/bench/notes.md)."""
    # Each schema is bounded (typed.SCHEMA_LIMIT) and so is their sum, so
    # that the line stays under the node's line limit (lifecycle/spawn.go).
    budget = HANDSHAKE_SCHEMA_BUDGET
    described = []
    for spec in app.functions.values():
        f: dict[str, Any] = {"name": spec.name, "raw": spec.raw, "stream": spec.stream}
        if spec.rate_limit is not None:
            f["rate_limit"] = spec.rate_limit
        for key, schema in spec.schemas().items():
            if schema is None:
                continue
            size = len(json.dumps(schema, separators=(",", ":")))
            if size > budget:
                continue  # the node publishes no schema for it
            budget -= size
            f[f"{key}_schema"] = schema
        described.append((spec, json.dumps(f, separators=(",", ":"))))
    return described
