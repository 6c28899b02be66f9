"""Test app for the jobs, cluster and session end-to-end tests (test/*_test.go).

Workers and even nodes differ from one delivery of a job to the next, so
whatever a function must remember across deliveries lives in files under a
directory the test passes in the payload ("dir").
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Any

from pyfleet import App, BadRequest

app = App()


def _worker_tag() -> str:
    """node_run_worker of this process, from the marker pyfleet sets."""
    wid = os.environ.get("PYFLEET_WORKER_ID", f"unknown/{os.getpid()}")
    return wid.replace("/", "_")


def _append(path: str, line: str) -> None:
    """One O_APPEND write per line: lines from several processes stay whole."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _field(payload: Any, key: str) -> Any:
    if not isinstance(payload, dict) or key not in payload:
        raise BadRequest(f"want an object with {key!r}, got {payload!r}")
    return payload[key]


@app.function
def work(payload: Any) -> Any:
    """Sleeps {"ms"} (default 0), records {"id"} in a file per worker under
    {"dir"} (if given) so the test can count executions, returns the payload."""
    ms = payload.get("ms", 0) if isinstance(payload, dict) else 0
    if ms:
        time.sleep(ms / 1000)
    if isinstance(payload, dict) and payload.get("dir"):
        _append(os.path.join(payload["dir"], _worker_tag() + ".log"), str(payload.get("id")))
    return payload


@app.function
def flaky(payload: Any) -> dict[str, Any]:
    """Fails the first {"fails"} (default 3) times it runs for {"key"}, then
    succeeds; the count lives in {"dir"}/flaky-<key>."""
    key = _field(payload, "key")
    fails = payload.get("fails", 3)
    path = os.path.join(_field(payload, "dir"), f"flaky-{key}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        attempt = len(os.read(fd, 1 << 16).splitlines()) + 1
        os.write(fd, f"{attempt} {_worker_tag()} {time.time():.3f}\n".encode())
    finally:
        os.close(fd)
    if attempt <= fails:
        raise RuntimeError(f"flaky {key}: failure {attempt} of {fails}")
    return {"key": key, "attempt": attempt}


@app.function
def always_fails(payload: Any) -> None:
    """Always raises; records each attempt in {"dir"}/fails-<key> if given."""
    if isinstance(payload, dict) and payload.get("dir"):
        _append(os.path.join(payload["dir"], f"fails-{payload.get('key')}"), _worker_tag())
    raise RuntimeError(f"always fails: {payload.get('key') if isinstance(payload, dict) else payload}")


@app.function
def long(payload: Any) -> dict[str, Any]:
    """Records its start in {"dir"}/long-<key>, sleeps {"seconds"}, returns."""
    key = _field(payload, "key")
    seconds = float(_field(payload, "seconds"))
    _append(os.path.join(_field(payload, "dir"), f"long-{key}"), f"{_worker_tag()} {time.time():.3f}")
    time.sleep(seconds)
    return {"key": key, "slept": seconds}


@app.function
def whoami(payload: Any) -> dict[str, Any]:
    """This worker's pid, the PID namespace that numbers it, and its
    pyfleet identity."""
    return {"pid": os.getpid(), "pidns": os.readlink("/proc/self/ns/pid"), "worker": os.environ.get("PYFLEET_WORKER_ID", "")}


@app.function
def echo(payload: Any) -> Any:
    return payload


@app.function
def sleep(payload: Any) -> dict[str, float]:
    """Sleeps {"ms"} milliseconds."""
    ms = float(_field(payload, "ms"))
    time.sleep(ms / 1000)
    return {"slept_ms": ms}
