"""Test app for the supervision gauges (test/metrics_containment_test.go):
functions that start children in the ways the per-worker process count
must follow, and say which worker they ran in."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from pyfleet import App

app = App()

# The Popen objects, so that the children are not reaped behind the test's
# back; the test decides when they die.
_children: list[subprocess.Popen[bytes]] = []


def _worker() -> str:
    # PYFLEET_WORKER_ID is <node>/<run>/<worker>-<start>.
    start = os.environ["PYFLEET_WORKER_ID"].rsplit("/", 1)[-1]
    return start.rsplit("-", 1)[0]


@app.function
def spawn(payload: Any) -> dict[str, Any]:
    """A sleeping child: {"clean": true} with a fresh environment, so
    without the pyfleet marker (found by its process group); {"setsid":
    true} in a session of its own (found by its marker)."""
    opts = payload if isinstance(payload, dict) else {}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")} if opts.get("clean") else None
    child = subprocess.Popen(
        ["sleep", "600"],
        env=env,
        start_new_session=bool(opts.get("setsid")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _children.append(child)
    return {"pid": os.getpid(), "worker": _worker(), "child": child.pid, "pidns": os.readlink("/proc/self/ns/pid")}
