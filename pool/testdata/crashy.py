"""A worker that dies by itself once the node serves it, on a plan.

CRASHY_PLAN names a file of lines, one per start of the worker, in order:
how many milliseconds the start lives after the node connects to it before
it exits with status 3, or "live" (lines past the end are "live" too).
CRASHY_PLAN.count, beside it, counts the starts; a pool of one worker starts
them one after another, so no lock is needed.
"""
import os
import threading
import time

from node_conns import node_connections
from pyfleet import App

app = App()


@app.function
def echo(payload):
    return payload


def _this_start_lives() -> str:
    plan_path = os.environ["CRASHY_PLAN"]
    count_path = plan_path + ".count"
    try:
        with open(count_path) as f:
            n = int(f.read())
    except FileNotFoundError:
        n = 0
    with open(count_path, "w") as f:
        f.write(str(n + 1))
    with open(plan_path) as f:
        plan = f.read().split()
    return plan[n] if n < len(plan) else "live"


def _node_connected() -> bool:
    """Whether a connection to the worker's socket is open (the node dials
    after the handshake line, checks health, then opens its stream)."""
    return any(True for _ in node_connections())


def _die_on_plan(ms: int) -> None:
    while not _node_connected():
        time.sleep(0.01)
    time.sleep(ms / 1000)
    os._exit(3)


_lives = _this_start_lives()
if _lives != "live":
    threading.Thread(target=_die_on_plan, args=(int(_lives),), daemon=True).start()
