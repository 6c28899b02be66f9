"""What typed functions cost (issue 13): per call, the binding, conversion
and validation of a typed function against a plain ``payload`` one, by
msgspec (what pyfleet uses) and by pydantic (the alternative measured);
per worker start, the import of each library.

    python bench/typed_bench.py [--calls 200000] [--imports 30]

Prints one JSON object; test/bench/notes.md ("Typed functions") quotes it.
A call is measured as the worker runs it (pyfleet/codec.py: the body to
the function's arguments, the call, the value to the reply's bytes), in one
thread, with no gRPC or NATS around it: the figures are what binding adds
to a call, not what a call costs end to end. Each figure is the median of
5 rounds. Imports are timed inside fresh interpreters (perf_counter around
the import statement), the median of --imports runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pydantic  # noqa: E402

from pyfleet import App, codec  # noqa: E402

app = App()


@dataclass
class Thumb:
    url: str
    width: int
    formats: list[str]


class ThumbModel(pydantic.BaseModel):
    url: str
    width: int
    formats: list[str]


class ResizeArgs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    url: str
    width: int = 256
    formats: list[str] = ["png"]


@app.function
def echo(payload):
    return payload


@app.function
def resize(url: str, width: int = 256, formats: list[str] = ["png"]) -> Thumb:
    return Thumb(url=url, width=width, formats=formats)


@app.function
def resize_model(args: ResizeArgs) -> ThumbModel:
    """The same, its arguments one pydantic model (in pyfleet's binder,
    which hands pydantic that field)."""
    return ThumbModel(url=args.url, width=args.width, formats=args.formats)


def pydantic_resize(body: bytes) -> bytes:
    """The same function bound by pydantic alone, as a binder built on
    pydantic would: one model of the parameters, validate_json, dump_json."""
    args = ResizeArgs.model_validate_json(body)
    return _thumb_adapter.dump_json(resize(url=args.url, width=args.width, formats=args.formats))


_thumb_adapter = pydantic.TypeAdapter(Thumb)

BODY = json.dumps({"url": "https://example.com/cat.png", "width": 128, "formats": ["png", "webp"]}).encode()
MODEL_BODY = json.dumps({"args": json.loads(BODY)}).encode()
BAD_BODY = json.dumps({"url": "https://example.com/cat.png", "width": "wide"}).encode()


def per_call(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    """Median µs per call of fn() over 5 rounds of n."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return round(statistics.median(rounds), 2)


def through_codec(name: str, body: bytes):  # type: ignore[no-untyped-def]
    spec = app.functions[name]
    call = codec.Call(id=1, function=name, payload=body)

    def one() -> bytes:
        return codec.encode(spec, codec.invoke(spec, call))

    return one


def refused(name: str, body: bytes):  # type: ignore[no-untyped-def]
    spec = app.functions[name]
    call = codec.Call(id=1, function=name, payload=body)

    def one() -> None:
        try:
            codec.invoke(spec, call)
        except codec.BadRequest:
            pass

    return one


def import_ms(statement: str, runs: int) -> float:
    """Median ms of statement in a fresh interpreter, from the clock set
    before it (or by its own last `t = time.perf_counter()`)."""
    code = (
        "import time, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "t = time.perf_counter()\n"
        f"{statement}\n"
        "print((time.perf_counter() - t) * 1000)\n"
    )
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(out.stdout))
    return round(statistics.median(times), 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--imports", type=int, default=30)
    a = p.parse_args()
    # The same result from each path: what is measured does the same work.
    assert json.loads(through_codec("resize", BODY)()) == json.loads(through_codec("echo", BODY)())
    assert json.loads(pydantic_resize(BODY)) == json.loads(through_codec("resize", BODY)())
    plain = per_call(through_codec("echo", BODY), a.calls)
    typed = per_call(through_codec("resize", BODY), a.calls)
    model = per_call(through_codec("resize_model", MODEL_BODY), a.calls)
    pyd = per_call(lambda: pydantic_resize(BODY), a.calls)
    bad = per_call(refused("resize", BAD_BODY), a.calls)
    out = {
        "body_bytes": len(BODY),
        "call_us": {
            "plain payload (json)": plain,
            "typed, msgspec (pyfleet)": typed,
            "typed, one pydantic model param (pyfleet hands it to pydantic)": model,
            "typed, pydantic alone": pyd,
            "typed, refused (400), msgspec": bad,
        },
        "added_over_plain_us": {
            "msgspec": round(typed - plain, 2),
            "pydantic model param": round(model - plain, 2),
            "pydantic alone": round(pyd - plain, 2),
        },
        "import_ms": {
            "msgspec": import_ms("import msgspec", a.imports),
            # What a worker pays for it: the rest of its imports come first.
            "msgspec, after the worker's other imports": import_ms(
                "import asyncio, inspect, typing, dataclasses, grpc, google.protobuf\n"
                "from grpc import aio\n"
                "t = time.perf_counter()\n"
                "import msgspec",
                a.imports,
            ),
            "pydantic": import_ms("import pydantic", a.imports),
            "pydantic BaseModel (first model class)": import_ms(
                "import pydantic\nclass M(pydantic.BaseModel):\n    x: int", a.imports
            ),
            "pyfleet.worker (msgspec included)": import_ms("import pyfleet.worker", a.imports),
            "grpc": import_ms("import grpc", a.imports),
        },
        "versions": {"msgspec": __import__("msgspec").__version__, "pydantic": pydantic.VERSION,
                     "python": sys.version.split()[0]},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
