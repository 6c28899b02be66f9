"""Test app for job priorities and rate limits (test/priorityrate_test.go).

What the test checks is written to files under the directory it passes in
the payload ("dir"): the order the jobs ran in, and when each rate-limited
call started.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pyfleet import App

app = App()


def _append(path: str, line: str) -> None:
    """One O_APPEND write per line: lines from several processes stay whole."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@app.function
def gate(payload: dict[str, Any]) -> str:
    """Writes {"dir"}/gate-started, then holds its worker until the file
    {"dir"}/gate-open exists (two minutes at most)."""
    _append(os.path.join(payload["dir"], "gate-started"), "1")
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(payload["dir"], "gate-open")):
        if time.monotonic() > deadline:
            raise RuntimeError("the gate was never opened")
        time.sleep(0.01)
    return "open"


@app.function
def record(payload: dict[str, Any]) -> str:
    """Appends {"id"} to {"dir"}/order: the order the jobs ran in."""
    _append(os.path.join(payload["dir"], "order"), payload["id"])
    return payload["id"]


@app.function(rate_limit="20/s")
def tick(payload: dict[str, Any]) -> float:
    """Appends when it started, and on which node's worker, to {"dir"}/ticks."""
    now = time.time()
    _append(os.path.join(payload["dir"], "ticks"), f"{now:.6f} {os.environ.get('PYFLEET_WORKER_ID', '?')}")
    return now
