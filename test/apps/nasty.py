"""The app the zero-orphan tests serve: functions that do what real code does
to a process supervisor on a bad day.

Every function answers with the pids it made, so a test can name each
process by pid and start time and check, after a stop or a kill, that each
one is gone. The pids are the worker's own view; where the worker runs in a
PID namespace of its own the host numbers the same processes differently,
so every answer with pids also names the namespace ("pidns", as
/proc/self/ns/pid reads), in which the test translates them. Functions that block write {"pid": <worker pid>, "thread": ...}
to the file named by payload["touch"] first, so a test knows the call is running
without sleeping.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from pyfleet import App, BadRequest

app = App()

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

# One multiprocessing tree per worker for mp_tree(once=true).
_tree: dict[str, int] | None = None


def _in_ns(answer: dict[str, Any]) -> dict[str, Any]:
    """answer, naming the PID namespace its pids are numbered in."""
    return {**answer, "pidns": os.readlink("/proc/self/ns/pid")}


def _arg(payload: Any, key: str, default: Any) -> Any:
    if isinstance(payload, dict):
        return payload.get(key, default)
    return default


def _touch(payload: Any) -> None:
    """Writes {"pid": ..., "thread": ...} to payload["touch"], atomically,
    if given: the worker's pid and the thread that runs the call."""
    path = _arg(payload, "touch", None)
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_in_ns({"pid": os.getpid(), "thread": threading.current_thread().name}), f)
    os.rename(tmp, path)


@app.function
def pid(payload: Any) -> dict[str, int]:
    """The worker's pid."""
    return _in_ns({"pid": os.getpid()})


@app.function
def spawn(payload: Any) -> dict[str, int]:
    """A `sleep` child in the worker's process group (subprocess: no
    parent-death signal), like the demo's spawn."""
    child = subprocess.Popen(
        ["sleep", str(_arg(payload, "seconds", 600))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return _in_ns({"pid": os.getpid(), "child": child.pid})


@app.function
def clean_env_spawn(payload: Any) -> dict[str, int]:
    """A `sleep` child started with a clean environment, as code that runs
    tools under a minimal PATH does: it carries no pyfleet marker.
    {"new_session": true} also puts it in a session of its own
    (start_new_session), out of the worker's process group: the daemon a
    helper library leaves behind."""
    child = subprocess.Popen(
        ["sleep", str(_arg(payload, "seconds", 600))],
        env={"PATH": "/usr/bin:/bin"},
        start_new_session=bool(_arg(payload, "new_session", False)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return _in_ns({"pid": os.getpid(), "child": child.pid})


def _mp_grandchild(seconds: float) -> None:
    time.sleep(seconds)


def _mp_child(conn: Any, seconds: float) -> None:
    ctx = multiprocessing.get_context("fork")
    grandchild = ctx.Process(target=_mp_grandchild, args=(seconds,), name="nasty-grandchild")
    grandchild.start()
    conn.send(grandchild.pid)
    conn.close()
    time.sleep(seconds)


@app.function
def mp_tree(payload: Any) -> dict[str, Any]:
    """A multiprocessing child that starts a grandchild; both sleep.

    {"once": true} starts a tree only if this worker has none yet (and
    answers "new": false otherwise); {"hold_ms": N} keeps the worker busy
    for N ms after, so that concurrent calls spread over the workers."""
    global _tree
    if _arg(payload, "once", False) and _tree is not None:
        return _in_ns({**_tree, "new": False})
    seconds = _arg(payload, "seconds", 600)
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_mp_child, args=(there, seconds), name="nasty-child")
    child.start()
    there.close()
    if not here.poll(30):
        raise RuntimeError("the multiprocessing child did not report its grandchild")
    tree = {"pid": os.getpid(), "child": child.pid, "grandchild": here.recv()}
    here.close()
    if _arg(payload, "once", False):
        _tree = tree
    time.sleep(_arg(payload, "hold_ms", 0) / 1000)
    return _in_ns({**tree, "new": True})


def _setsid_sh(seconds: float) -> int:
    # sh leads a new session (subprocess runs no at-fork hooks: no
    # parent-death signal), starts sleep in the background and exits: the
    # sleep is a grandchild of the worker, outside its group and session,
    # whose parent is gone.
    out = subprocess.run(
        ["sh", "-c", f"sleep {seconds} </dev/null >/dev/null 2>&1 & echo $!"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(out.stdout.strip())


def _setsid_fork(seconds: float) -> int:
    # The classic daemon: fork, setsid, fork again, the middle one exits.
    # The runtime gives each fork a parent-death signal; a daemonising
    # library (or an exec of a set-uid binary) drops it, and so do we.
    report_r, report_w = os.pipe()
    armed_r, armed_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(report_r)
            os.setsid()
            _libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
            daemon = os.fork()
            if daemon == 0:
                os.close(armed_r)
                _libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
                os.write(armed_w, b"x")
                os.write(report_w, str(os.getpid()).encode())
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.execvp("sleep", ["sleep", str(seconds)])
            # Exit only once the daemon no longer dies with us (or died).
            os.close(armed_w)
            os.read(armed_r, 1)
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(armed_r)
    os.close(armed_w)
    data = b""
    while chunk := os.read(report_r, 64):
        data += chunk
    os.close(report_r)
    os.waitpid(middle, 0)
    if not data:
        raise RuntimeError("the daemon did not report its pid")
    return int(data)


@app.function
def setsid_sleep(payload: Any) -> dict[str, int]:
    """A grandchild that left the worker's process group and session
    (setsid) and lost its parent (double fork), sleeping.
    {"how": "sh"} (default) or {"how": "fork"}."""
    seconds = _arg(payload, "seconds", 600)
    how = _arg(payload, "how", "sh")
    if how == "sh":
        grandchild = _setsid_sh(seconds)
    elif how == "fork":
        grandchild = _setsid_fork(seconds)
    else:
        raise BadRequest(f"how: want sh or fork, got {how!r}")
    return _in_ns({"pid": os.getpid(), "grandchild": grandchild})


@app.function
async def ignore_sigterm(payload: Any) -> dict[str, int]:
    """Makes this worker ignore SIGTERM (on the event loop: the main thread,
    where signal handlers are set)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return _in_ns({"pid": os.getpid()})


@app.function
def c_sleep(payload: Any) -> None:
    """Blocks the call in C for good: a signal only interrupts one sleep(3),
    and the loop goes straight back in. A sync call: in a call thread with
    --concurrency above 1, inline on the event loop otherwise."""
    _touch(payload)
    while True:
        _libc.sleep(3600)


@app.function
async def c_sleep_loop(payload: Any) -> None:
    """Blocks the worker's event loop (its main thread) in C for good, so
    it cannot even see a SIGTERM."""
    _touch(payload)
    while True:
        _libc.sleep(3600)


@app.function
def sleep_ms(payload: Any) -> dict[str, int]:
    """A long sync call: sleeps {"ms": N} milliseconds."""
    _touch(payload)
    time.sleep(_arg(payload, "ms", 0) / 1000)
    return _in_ns({"pid": os.getpid()})


@app.function
def exit_now(payload: Any) -> None:
    """The worker process exits by itself, at once, with {"code": N} (default 3)."""
    sys.stdout.flush()
    os._exit(int(_arg(payload, "code", 3)))
