"""The functions `make bench` calls (test/bench): the same echo as a plain
function and as a coroutine, which a worker runs in different ways."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from pyfleet import App, Context

app = App()

# The containment figures (test/bench/contain.go) give each worker one child
# that only kernel containment reaches once the node is dead: a clean
# environment (no PYFLEET_WORKER_RUN marker) and a session of its own (out
# of the worker's process group). Its argv[0] is the harness's tag, so the
# harness finds and kills exactly its own, never a sleep of anyone else.
_CLEAN_CHILD_TAG = os.environ.get("BENCH_CLEAN_CHILD")
clean_child = (
    subprocess.Popen(
        [_CLEAN_CHILD_TAG, "600"],
        executable="sleep",
        env={"PATH": "/usr/bin:/bin"},
        start_new_session=True,
    )
    if _CLEAN_CHILD_TAG
    else None
)


@app.function
def echo(payload: Any) -> Any:
    """Returns its payload."""
    return payload


@app.function
async def echo_async(payload: Any) -> Any:
    """Returns its payload, on the worker's event loop."""
    return payload


# The "fnargs" section (test/bench/fnargs.go): what a typed signature and a
# pyfleet.Context cost per call against echo, through the node. Both take
# and return what echo does for the bench's payload ({"message":...,"n":1}).


@app.function
def echo_typed(message: str, n: int) -> dict[str, Any]:
    """echo, its body bound and validated by name (pyfleet/typed.py)."""
    return {"message": message, "n": n}


@app.function
def echo_ctx(payload: Any, ctx: Context) -> Any:
    """echo with a pyfleet.Context it does not use."""
    return payload
