"""Typed functions: a call's JSON object bound to the function's parameters
by name, converted and validated from their annotations, and the JSON
Schema of what a function takes and returns.

The binding rule (README, "Writing an app"): a function whose only
parameter (injected ones aside) is named ``payload`` gets the whole body,
as it always has. Any other signature takes a JSON object whose fields are
its parameters.

msgspec does the work, chosen by measurement (python/bench/typed.py,
docs/benchmarks.md): the parameters become one msgspec Struct built when the
function is registered, so a call is decoded, converted and checked in one
pass of C, with errors that name the field and the expected type. pydantic
models are taken too when pydantic is installed: msgspec hands such a field
over as raw JSON, and pydantic validates it. pydantic is never imported by
pyfleet: a model's class can only exist if the app imported it.

Injected parameters (the call context, pyfleet.Context) are skipped by the
binder: ``is_injected`` says which, and ``Binder.bind`` takes their values
from the caller.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import msgspec.structs

from .errors import BadRequest

# The whole body: the one parameter of a plain function.
PAYLOAD = "payload"

# The largest schema (compact JSON) that goes into the handshake and the
# node's metadata; a larger one is replaced by a note saying so. The
# handshake line must stay under the node's line limit (lifecycle/spawn.go,
# maxLine: 64 KiB), and `nats micro info` under a NATS message.
SCHEMA_LIMIT = 4096


def is_injected(annotation: Any) -> bool:
    """Whether a parameter so annotated is injected rather than bound from
    the body: the class named Context from the pyfleet package (defined by
    the call context, pyfleet/context.py once it exists). Matched by name so
    that this module need not import it."""
    return (
        isinstance(annotation, type)
        and annotation.__name__ == "Context"
        and annotation.__module__.split(".")[0] == "pyfleet"
    )


def _pydantic_model() -> type | None:
    """pydantic's BaseModel if the app imported pydantic, else None."""
    mod = sys.modules.get("pydantic")
    return getattr(mod, "BaseModel", None) if mod is not None else None


def _has_pydantic(tp: Any) -> bool:
    """Whether a pydantic model appears anywhere in the annotation tp."""
    base = _pydantic_model()
    if base is None:
        return False
    seen: list[Any] = [tp]
    while seen:
        t = seen.pop()
        if isinstance(t, type) and issubclass(t, base):
            return True
        seen.extend(typing.get_args(t))
    return False


def _type_name(tp: Any) -> str:
    if tp is inspect.Parameter.empty or tp is Any:
        return "any JSON value"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return repr(tp).replace("typing.", "")


_asdict = msgspec.structs.asdict


def _item_type(fn: Callable[..., Any], returns: Any) -> Any:
    """What one answer holds: a generator's items (the X of Iterator[X],
    Generator[X, ...], AsyncIterator[X]...), or the return value."""
    if not (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)):
        return returns
    args = typing.get_args(returns)
    return args[0] if args else inspect.Parameter.empty


def _copying(default: Any) -> Callable[[], Any]:
    return lambda: copy.deepcopy(default)


class Binder:
    """How one function takes a call's body: whole, or bound by name.

    ``bind(body, inject)`` returns (args, kwargs) for the function, or raises
    BadRequest naming the field at fault; ``inject(annotation)`` gives the
    value of each injected parameter.
    """

    def __init__(self, fn: Callable[..., Any], name: str, raw: bool) -> None:
        self.name = name
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"function {name!r}: cannot read its signature: {exc}") from None
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as exc:  # a string annotation naming what is not there
            raise TypeError(f"function {name!r}: cannot resolve its annotations: {exc}") from None
        self.injected: dict[str, Any] = {}
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            ann = hints.get(p.name, inspect.Parameter.empty)
            if is_injected(ann):
                self.injected[p.name] = ann
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(
                    f"function {name!r}: parameter {p.name!r}: *args and **kwargs cannot be "
                    "bound from a JSON object; name each parameter"
                )
            params.append(p)
        self._positional = [p.name for p in sig.parameters.values()
                            if p.kind is p.POSITIONAL_ONLY]
        self.raw = raw
        # The parameter that takes the whole body, by name.
        self.body_param = params[0].name if params else PAYLOAD
        self.whole = raw or (len(params) == 1 and params[0].name == PAYLOAD)
        # plain: called as always, fn(body), with nothing to inject.
        self.plain = self.whole and not self.injected and (
            not params or params[0].kind is not inspect.Parameter.KEYWORD_ONLY
        )
        self.returns = _item_type(fn, hints.get("return", inspect.Parameter.empty))
        self._fields: list[str] = [p.name for p in params]
        self._pydantic: dict[str, Any] = {}  # field -> its pydantic TypeAdapter
        self._hints = {p.name: hints.get(p.name, inspect.Parameter.empty) for p in params}
        self._defaults = {p.name: p.default for p in params if p.default is not p.empty}
        if self.whole:
            return
        fields: list[tuple[Any, ...]] = []
        for p in params:
            ann = self._hints[p.name]
            tp: Any = Any if ann is inspect.Parameter.empty else ann
            if _has_pydantic(tp):
                from pydantic import TypeAdapter  # the app has imported pydantic already

                self._pydantic[p.name] = TypeAdapter(tp)
                tp = msgspec.Raw
            if p.default is p.empty:
                fields.append((p.name, tp))
            elif isinstance(p.default, (list, dict, set, bytearray)) or dataclasses.is_dataclass(p.default):
                # Each call gets its own copy, as a mutable default should.
                fields.append((p.name, tp, msgspec.field(default_factory=_copying(p.default))))
            else:
                fields.append((p.name, tp, p.default))
        # Nothing to inject and no positional-only parameter: the decoded
        # fields are the keyword arguments as they are.
        self._simple = not self.injected and not self._positional
        try:
            self._args = msgspec.defstruct(
                f"{name}_args", fields, forbid_unknown_fields=True, module=__name__
            )
            self._decoder = msgspec.json.Decoder(self._args)
            # msgspec takes any class, but no JSON decodes to one it does
            # not know (it would need a dec_hook): its schema tells.
            msgspec.json.schema_components([self._args])
        except (TypeError, ValueError) as exc:
            why = str(exc).strip().splitlines()[-1]
            raise TypeError(
                f"function {name!r}: unsupported parameter type: {why}; parameters may be "
                "builtins, list/dict/tuple, Optional, Literal, dataclasses, TypedDict, "
                "msgspec.Struct or pydantic models"
            ) from None

    def bind(
        self, body: bytes, inject: Callable[[Any], Any] | None = None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Arguments of a typed function (not ``whole``: codec.arguments
        decodes the whole body of the others)."""
        if not body:
            body = b"{}"  # no body: a call with no arguments
        try:
            args = self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise BadRequest(self._explain(str(exc))) from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed JSON: {exc}") from None
        values = _asdict(args)
        if self._pydantic:
            for field, adapter in self._pydantic.items():
                if isinstance(values[field], msgspec.Raw):  # else the default
                    values[field] = _validate_pydantic(adapter, field, values[field])
        if self._simple:
            return (), values
        return self.finish(values, inject)

    def _explain(self, msg: str) -> str:
        """msgspec's complaint as "field: problem", with the parameter's
        annotation where the problem does not name the type expected."""
        if msg.startswith("Expected `object`, got `") and " - at `" not in msg:
            got = msg[len("Expected `object`, got `"):].rstrip("`")
            hint = ""
            if len(self._fields) == 1:
                hint = " (only a parameter named payload takes the whole body)"
            return (
                f"{self.name} takes a JSON object of its parameters "
                f"({', '.join(self._fields) or 'none'}), not {got}{hint}"
            )
        text = _field_error(msg)
        field = text.split(":", 1)[0].split(".", 1)[0].split("[", 1)[0]
        if field in self._hints and ":" in text and "." not in text.split(":", 1)[0] \
                and "[" not in text.split(":", 1)[0] and "expected `" not in text:
            text += f" (expected {_type_name(self._hints[field])})"
        return text

    def finish(
        self, values: dict[str, Any], inject: Callable[[Any], Any] | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments: values by name plus the injected ones."""
        for param, ann in self.injected.items():
            if inject is None:
                raise RuntimeError(f"nothing injects parameter {param!r} of {self.name!r}")
            values[param] = inject(ann)
        if not self._positional:
            return (), values
        return tuple(values.pop(p) for p in self._positional), values

    def schemas(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The JSON Schema of the body and of the return value (None for
        a raw function's bytes); ``{}`` where anything goes."""
        if self.whole:
            return (None, None) if self.raw else ({}, _schema_of(self.returns))
        props: dict[str, Any] = {}
        defs: dict[str, Any] = {}
        for f in self._fields:
            ann = self._hints[f]
            s = _schema_of(ann, defs)
            if f in self._defaults:
                default = self._defaults[f]
                try:
                    s = {**s, "default": msgspec.to_builtins(default)}
                except TypeError:
                    pass
            props[f] = s
        schema: dict[str, Any] = {
            "type": "object",
            "properties": props,
            "additionalProperties": False,
        }
        required = [f for f in self._fields if f not in self._defaults]
        if required:
            schema["required"] = required
        if defs:
            schema["$defs"] = defs
        return schema, _schema_of(self.returns)


def _schema_of(ann: Any, defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON Schema of one annotation; named types go into defs (a fresh
    $defs of their own when defs is None)."""
    if ann is inspect.Parameter.empty or ann is Any:
        return {}
    own = defs is None
    if own:
        defs = {}
    assert defs is not None
    if _has_pydantic(ann):
        from pydantic import TypeAdapter

        s = TypeAdapter(ann).json_schema(ref_template="#/$defs/{model}")
        defs.update(s.pop("$defs", {}))
    else:
        try:
            (s,), comps = msgspec.json.schema_components([ann], ref_template="#/$defs/{name}")
        except (TypeError, ValueError):
            return {}
        defs.update(comps)
    if own and defs:
        s = {**s, "$defs": defs}
    return s


def _field_error(msg: str) -> str:
    """msgspec's message with the field first: "Expected `int`, got `str` -
    at `$.width`" -> "width: expected `int`, got `str`"."""
    text, sep, where = msg.rpartition(" - at `")
    if not sep:
        # "Object missing required field `url`", "Object contains unknown field `x`"
        for lead, say in (
            ("Object missing required field `", "missing required field"),
            ("Object contains unknown field `", "unknown field"),
        ):
            if msg.startswith(lead):
                field = msg[len(lead):].split("`", 1)[0]
                return f"{field}: {say}"
        return msg
    path = where.rstrip("`")
    path = path[2:] if path.startswith("$.") else path
    text = text[0].lower() + text[1:] if text else text
    for lead, say in (
        ("object missing required field `", "missing required field"),
        ("object contains unknown field `", "unknown field"),
    ):
        if text.startswith(lead):
            field = text[len(lead):].split("`", 1)[0]
            return f"{path}.{field}: {say}"
    return f"{path}: {text}"


def _validate_pydantic(adapter: Any, field: str, raw: msgspec.Raw) -> Any:
    try:
        return adapter.validate_json(bytes(raw))
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        if errors is None:
            raise BadRequest(f"{field}: {exc}") from None
        parts = []
        for e in errors(include_url=False):
            loc = ".".join([field, *(str(x) for x in e.get("loc", ()))])
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        raise BadRequest("; ".join(parts)) from None


def bounded(schema: dict[str, Any] | None, limit: int = SCHEMA_LIMIT) -> dict[str, Any] | None:
    """schema, or a note in its place when its compact JSON is over limit."""
    if schema is None:
        return None
    size = len(json.dumps(schema, separators=(",", ":")))
    if size <= limit:
        return schema
    return {"$comment": f"pyfleet: schema of {size} bytes left out (limit {limit})"}


def describe(binders: Mapping[str, Binder]) -> dict[str, dict[str, Any]]:
    """Each function's bounded input and output schema, by name."""
    out = {}
    for name, b in binders.items():
        inp, outp = b.schemas()
        out[name] = {"input": bounded(inp), "output": bounded(outp)}
    return out
