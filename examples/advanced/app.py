"""advanced: stages of a pipeline, each a function, and functions that
fail in each way a call can.

    bin/poolnode --app examples/advanced/app.py --workers 2
"""

import asyncio
import re
from collections import Counter

from pyfleet import App, BadRequest

app = App()

DOCS = {
    "nats": "NATS is a simple secure and performant communications system "
    "for digital systems services and devices",
    "python": "Python is a programming language that lets you work quickly "
    "and integrate systems more effectively",
    "go": "Go is an open source programming language that makes it simple "
    "to build secure scalable systems",
}


@app.function
def fetch(payload):
    """Stage 1: a document by id."""
    try:
        return DOCS[payload["id"]]
    except KeyError:
        raise BadRequest(f"no document {payload.get('id')!r}") from None


@app.function
def tokenize(payload):
    """Stage 2: text to lower-case words."""
    if not isinstance(payload, str):
        raise BadRequest(f"tokenize takes a string, not {type(payload).__name__}")
    return re.findall(r"[a-z]+", payload.lower())


@app.function
def count(payload):
    """Stage 3: words to counts."""
    return dict(Counter(payload))


@app.function
def top(payload):
    """Stage 4: the n most frequent words, ties by word."""
    counts = payload["counts"]
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: payload["n"]]


@app.function
def divide(payload):
    """Fails as plain Python does: ZeroDivisionError reaches the caller by type."""
    return payload["a"] / payload["b"]


@app.function
async def slow(payload):
    await asyncio.sleep(payload["s"])
    return "done"
