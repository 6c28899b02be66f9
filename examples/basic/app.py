"""basic: the smallest useful app.

Serve it (from the checkout) with two workers:

    bin/poolnode --app examples/basic/app.py --workers 2

then run ``python examples/basic/client.py``.
"""

import os

from pyfleet import App, BadRequest

app = App()


@app.function
def echo(payload):
    return payload


@app.function
def add(payload):
    try:
        return payload["a"] + payload["b"]
    except (TypeError, KeyError):
        raise BadRequest('want {"a": number, "b": number}') from None


@app.function
def whoami(payload):
    """The worker's pid: which of the pool's processes answered."""
    return {"pid": os.getpid()}
