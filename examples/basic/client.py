"""basic: call, catch a 400, submit a job, list the nodes.

    python examples/basic/client.py [NATS_URL]

Prints what each step returns, then one ``figure:`` line (the p50 of a
call at one in flight), which ``make examples`` reports.
"""

import os
import statistics
import sys
import time

from pyfleet import BadRequest, Client

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("NATS_URL", "nats://127.0.0.1:4222")

with Client(url, pool="default") as c:
    print("echo ->", c.call("echo", {"hi": 1}))
    print("add ->", c.call("add", {"a": 2, "b": 3}))
    try:
        c.call("add", {"a": 2})
        sys.exit("add without b did not raise BadRequest")
    except BadRequest as e:
        print(f"add without b -> {e.code} {e.type}: {e.message}")

    job = c.submit("add", {"a": 40, "b": 2})
    print(f"job {job.id} ->", job.result(timeout=30.0))

    nodes = c.nodes()
    workers = sum(n["workers"] or 0 for n in nodes)
    print("nodes ->", [(n["node"], n["workers"]) for n in nodes])

    took = []
    pids = set()
    for _ in range(200):
        start = time.perf_counter()
        pids.add(c.call("whoami")["worker"])
        took.append(time.perf_counter() - start)
    p50 = statistics.median(took) * 1000
    print(f"figure: p50 {p50:.2f} ms per call over 200 calls, {len(pids)} of {workers} workers answered")
