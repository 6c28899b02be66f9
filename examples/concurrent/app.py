"""concurrent: a function that waits (as one calling a slow service
would), served by many workers at once.

    bin/poolnode --app examples/concurrent/app.py --workers 100
"""

import time

from pyfleet import App, worker_id

app = App()


@app.function
def work(payload):
    time.sleep(payload.get("ms", 50) / 1000)
    return worker_id()
