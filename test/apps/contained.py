"""The app the containment tests serve: one function per thing user code
must find unchanged whatever the node's containment mode (issue 10: "user
code sees no difference"). Each function checks what it can from inside
and answers with what it saw; the test compares the answers of every mode
with those of the group mode, and with what the host's /proc says.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
from typing import Any

import psutil

from pyfleet import App

app = App()

# Memory one call allocated and keeps, so the test can read the worker's RSS
# from outside while it is held.
_held: list[bytearray] = []


def _status(field: str) -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    raise LookupError(field)


@app.function
def whoami(payload: Any) -> dict[str, Any]:
    """The worker's pid as every interface tells it."""
    with open("/proc/self/stat") as f:
        stat_pid = int(f.read().split(" ", 1)[0])
    return {
        "pid": os.getpid(),
        "self": int(os.readlink("/proc/self")),
        "status_pid": int(_status("Pid")),
        "stat_pid": stat_pid,
        "psutil_pid": psutil.Process().pid,
        "pgrp": os.getpgrp(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cmdline": psutil.Process(os.getpid()).cmdline(),
    }


@app.function
def memory(payload: Any) -> dict[str, int]:
    """psutil's figures for this process, before and after it allocates and
    keeps payload["mb"] MB (touched, so resident)."""
    me = psutil.Process(os.getpid())
    before = me.memory_info().rss
    block = bytearray(payload["mb"] << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _held.append(block)
    after = me.memory_info().rss
    return {"before": before, "after": after, "vmrss": int(_status("VmRSS").split()[0]) * 1024}


def _square(x: int) -> tuple[int, int, int]:
    return x * x, os.getpid(), os.getppid()


@app.function
def mp(payload: Any) -> dict[str, Any]:
    """A multiprocessing pool of the given start method squares numbers and
    says which processes did it."""
    ctx = multiprocessing.get_context(payload["method"])
    with ctx.Pool(2) as pool:
        out = pool.map(_square, range(1, 6))
    return {
        "squares": [r[0] for r in out],
        "parents": sorted({r[2] for r in out}),
        "children": sorted({r[1] for r in out}),
        "pid": os.getpid(),
    }


@app.function
def exit_codes(payload: Any) -> dict[str, Any]:
    """subprocess exit codes, n times, while orphans (the backgrounded
    sleeps, whose shell exits first) keep dying around them: whatever reaps
    the orphans must not take these statuses."""
    codes = []
    for _ in range(payload.get("n", 20)):
        codes.append(subprocess.run(["sh", "-c", "(sleep 0.01 &); exit 7"]).returncode)
    p = subprocess.Popen(["sh", "-c", "exit 9"])
    _, status = os.waitpid(p.pid, 0)
    return {"codes": codes, "waitpid": os.waitstatus_to_exitcode(status)}


@app.function
def kill_child(payload: Any) -> dict[str, Any]:
    """os.kill of the worker's own child."""
    child = subprocess.Popen(["sleep", "60"])
    os.kill(child.pid, signal.SIGTERM)
    return {"returncode": child.wait(timeout=10)}


@app.function
def slow(payload: Any) -> dict[str, Any]:
    """Creates the file payload["touch"] (so the test knows the call runs),
    sleeps payload["ms"], then answers with the worker's pid: a call that a
    graceful stop lets finish."""
    with open(payload["touch"], "w"):
        pass
    time.sleep(payload["ms"] / 1000)
    return {"pid": os.getpid()}


@app.function
def clean_child(payload: Any) -> dict[str, int]:
    """The other orphan row of issue 10: a child in the worker's group with a
    clean environment (no pyfleet marker)."""
    child = subprocess.Popen(
        ["sleep", "600"],
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return {"pid": os.getpid(), "child": child.pid}


@app.function
def helper_daemon(payload: Any) -> dict[str, int]:
    """The orphan-row function of issue 10: a daemon in a clean environment
    (no pyfleet marker) and a session of its own."""
    child = subprocess.Popen(
        ["sleep", "600"],
        env={"PATH": "/usr/bin:/bin"},
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return {"pid": os.getpid(), "child": child.pid}
