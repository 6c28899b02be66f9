"""The codec: a call's payload to the function's argument, the function's
values to payloads, and every outcome of a call to its frame.

This is the worker's side of the JSON rule. The node refuses payloads Python
cannot take first, by one rule (checkJSON in bus/validate.go: nesting over 64
levels, numbers beyond a float64, integers over 4300 digits, text that is not
UTF-8, lone surrogates); decode keeps the same promise should one get
through: a payload that cannot be decoded is the caller's fault (400), never
a 500 with a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from ._proto import worker_pb2
from .app import BadRequest, FunctionSpec

Call = worker_pb2.Call
Result = worker_pb2.Result
ResultBatch = worker_pb2.ResultBatch
Error = worker_pb2.Error
CHUNK = worker_pb2.Result.CHUNK


def _pydantic_hook(value: Any) -> Any:
    """A pydantic model as JSON builtins (pydantic is never imported here:
    a model exists only if the app imported it)."""
    dump = getattr(value, "model_dump", None)
    if dump is not None and hasattr(type(value), "model_fields"):
        return dump(mode="json")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _builtins(value: Any) -> Any:
    """What json cannot encode itself: dataclasses, msgspec Structs and
    pydantic models, as JSON builtins, so that a plain function may return
    them too. Called only for such values: plain ones cost nothing more."""
    if isinstance(value, msgspec.Struct) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        return msgspec.to_builtins(value)
    # Sets and the like stay refused, as they always were: JSON has no set.
    return _pydantic_hook(value)


# A typed function's values are encoded by msgspec, which decoded its
# arguments: an order of magnitude quicker than json for a dataclass
# (python/bench/typed_bench.py). As msgspec and pydantic do, it writes NaN
# and the infinities as null, where json (a plain function's) refuses them.
_encode_typed = msgspec.json.Encoder(enc_hook=_pydantic_hook).encode


# Built once: json.dumps with arguments builds a new encoder on every call.
# allow_nan=False because NaN and Infinity are not JSON to other languages.
_encode_json = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_builtins
).encode


def _not_json(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


# parse_constant is called for NaN and (-)Infinity only, so refusing them
# costs ordinary payloads nothing.
_decode_json = json.JSONDecoder(parse_constant=_not_json).decode


def decode(spec: FunctionSpec, payload: bytes) -> Any:
    """The function's argument; BadRequest if the payload is not one."""
    if spec.raw:
        return payload
    if not payload:
        # An empty body (a call with no arguments) reads as JSON null.
        return None
    try:
        return _decode_json(payload.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer over sys.get_int_max_str_digits();
        # RecursionError: nesting deeper than the interpreter's stack.
        raise BadRequest(f"JSON not accepted: {exc}") from None


def invoke(spec: FunctionSpec, call: Call, inject: Callable[[Any], Any] | None = None) -> Any:
    """Calls the function with the call's arguments (by the binding rule,
    pyfleet/typed.py); ``inject(annotation)`` gives each injected parameter.
    BadRequest if the body does not fit the function."""
    binder = spec.binder
    if binder.plain:
        return spec.fn(decode(spec, call.payload))
    args, kwargs = arguments(spec, call.payload, inject)
    return spec.fn(*args, **kwargs)


def arguments(
    spec: FunctionSpec, payload: bytes, inject: Callable[[Any], Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The function's positional and keyword arguments for a body."""
    binder = spec.binder
    if not binder.whole:
        return binder.bind(payload, inject)
    return binder.finish({binder.body_param: decode(spec, payload)}, inject)


def encode(spec: FunctionSpec, value: Any, what: str = "return value") -> bytes:
    """The payload for a value the function returned (or yielded: `what`
    names which in the error); TypeError if it cannot be one."""
    if spec.raw:
        if isinstance(value, bytes):
            return value
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        raise TypeError(
            f"{what} of raw function {spec.name!r} must be bytes, not {type(value).__name__}"
        )
    try:
        if not spec.binder.whole:
            return _encode_typed(value)
        return _encode_json(value).encode()
    except (TypeError, ValueError, RecursionError, msgspec.EncodeError) as exc:
        raise TypeError(f"{what} of {spec.name!r} is not JSON-serialisable: {exc}") from None


def chunk(call: Call, spec: FunctionSpec, item: Any) -> Result:
    """The CHUNK frame for one item a generator yielded."""
    return Result(id=call.id, kind=CHUNK, payload=encode(spec, item, "yielded value"))


def error(call_id: int, code: int, typ: str, message: str) -> Result:
    """An END frame with an error; code follows HTTP (proto/worker.proto)."""
    return Result(id=call_id, error=Error(code=code, type=typ, message=message))


def failure(call: Call, spec: FunctionSpec, exc: BaseException) -> Result:
    """The END frame for a function that raised; 500s log their traceback."""
    if isinstance(exc, BadRequest):
        # str() of a RemoteError adds the code and type, which the reply
        # carries in fields of their own.
        return error(call.id, 400, type(exc).__name__, exc.message)
    # One write, so that tracebacks of concurrent calls do not interleave.
    sys.stderr.write(
        f"pyfleet: {spec.name} raised (call {call.id}, request {call.request_id or '-'}):\n"
        + "".join(traceback.format_exception(exc))
    )
    return error(call.id, 500, type(exc).__name__, str(exc))


def unknown_function(call: Call) -> Result:
    return error(call.id, 404, "NotFound", f"no function named {call.function!r}")


def shutting_down(call: Call) -> Result:
    return error(call.id, 503, "Unavailable", "worker is shutting down")


def stopped(call: Call, spec: FunctionSpec, reason: str) -> Result:
    """The END frame for an async call cancelled by the node (reason
    "Cancelled") or at its deadline ("DeadlineExceeded")."""
    if reason == "DeadlineExceeded":
        return error(call.id, 408, reason, f"{spec.name} passed its deadline of {call.timeout_ms} ms")
    return error(call.id, 499, reason, f"{spec.name} was cancelled")
