"""basic: the smallest useful app.

Serve it (from the checkout) with two workers:

    bin/poolnode --app examples/basic/app.py --workers 2

then run ``python examples/basic/client.py``.
"""

from pyfleet import App, BadRequest, worker_id

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
    """Which of the pool's workers answered (os.getpid() would not tell:
    in PID namespaces every worker numbers itself alike)."""
    return {"worker": worker_id()}
