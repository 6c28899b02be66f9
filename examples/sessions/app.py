"""sessions: state kept in a worker's memory, which only a session can
count on reaching again.

    bin/poolnode --app examples/sessions/app.py --workers 4
"""

import time

from pyfleet import App, BadRequest, worker_id

app = App()

# Per worker process: each worker has its own.
_store: dict[str, object] = {}


@app.function
def put(payload):
    time.sleep(0.05)  # long enough that sessions opened together spread over the workers
    _store[payload["key"]] = payload["value"]
    return {"worker": worker_id()}


@app.function
def get(payload):
    key = payload["key"]
    if key not in _store:
        raise BadRequest(f"worker {worker_id()} holds no {key!r}")
    return {"worker": worker_id(), "value": _store[key]}
