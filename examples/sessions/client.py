"""sessions: every call of a session reaches the worker that took its
first call.

    python examples/sessions/client.py [NATS_URL]

Opens 12 sessions at once; each stores a value in its worker's memory
and reads it back 10 times. Each read must find it on the same worker;
the same reads without a session land on whichever worker is free.
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

from pyfleet import BadRequest, Client

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
SESSIONS, READS = 12, 10


def run_session(c, i):
    with c.session() as s:
        key = f"user-{i}"
        pid = s.call("put", {"key": key, "value": i})["worker"]
        for _ in range(READS):
            got = s.call("get", {"key": key})
            if got != {"worker": pid, "value": i}:
                sys.exit(f"session {i}: read {got}, want value {i} from worker {pid}")
        return pid, s.node


with Client(url, pool="default") as c:
    workers = sum(n["workers"] or 0 for n in c.nodes())
    with ThreadPoolExecutor(SESSIONS) as ex:  # one Client, many threads
        held = list(ex.map(lambda i: run_session(c, i), range(SESSIONS)))
    for i, (pid, node) in enumerate(held):
        print(f"session {i}: worker {pid} on {node}")

    # Without a session a read goes to any free worker.
    misses = 0
    with ThreadPoolExecutor(4) as ex:
        def read(i):
            try:
                c.call("get", {"key": f"user-{i % SESSIONS}"})
                return 0
            except BadRequest:
                return 1
        misses = sum(ex.map(read, range(40)))
    print(f"without a session: {misses} of 40 reads reached a worker without the value")

    used = len({pid for pid, _ in held})
    print(f"figure: {SESSIONS} sessions x {READS + 1} calls, all on their own worker; "
          f"{used} of {workers} workers held sessions")
