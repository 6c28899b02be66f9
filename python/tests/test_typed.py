"""Typed functions (pyfleet/typed.py): binding by name, conversion and
validation for each family of annotations, the 400s naming the field, the
schemas, and the encoding of typed return values."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any, Literal, Optional, TypedDict

import msgspec
import pydantic
import pytest

from pyfleet import App, BadRequest, codec
from pyfleet.typed import SCHEMA_LIMIT, is_injected


def run(app: App, name: str, body: bytes | str, inject: Any = None) -> Any:
    """The function's result as JSON, decoded, through the worker's codec."""
    spec = app.functions[name]
    if isinstance(body, str):
        body = body.encode()
    value = codec.invoke(spec, codec.Call(id=1, function=name, payload=body), inject)
    return json.loads(codec.encode(spec, value))


def refused(app: App, name: str, body: str) -> str:
    with pytest.raises(BadRequest) as e:
        run(app, name, body)
    return e.value.message


# -------------------------------------------------------------- the binding rule


def test_a_function_of_payload_alone_gets_the_whole_body() -> None:
    app = App()

    @app.function
    def whole(payload):
        return payload

    @app.function
    def typed_payload(payload: int):  # annotated, still the whole body as always
        return payload

    assert app.functions["whole"].binder.plain
    assert run(app, "whole", "[1,2]") == [1, 2]
    assert run(app, "whole", "") is None
    assert run(app, "typed_payload", '"not an int"') == "not an int"
    assert app.functions["whole"].schemas() == {"input": {}, "output": {}}


def test_any_other_signature_takes_an_object_bound_by_name() -> None:
    app = App()

    @app.function
    def add(a: int, b: int = 2, /, *, c: int = 0) -> int:
        return a + b + c

    @app.function
    def nothing() -> str:
        return "ok"

    @app.function
    def data(data):  # one parameter not named payload: bound by name
        return data

    assert run(app, "add", '{"a":1}') == 3
    assert run(app, "add", '{"a":1,"b":5,"c":10}') == 16
    assert run(app, "nothing", "") == "ok"  # no body: no arguments
    assert run(app, "nothing", "{}") == "ok"
    assert run(app, "data", '{"data":[1]}') == [1]
    assert refused(app, "data", "[1]") == (
        "data takes a JSON object of its parameters (data), not array"
        " (only a parameter named payload takes the whole body)"
    )
    assert refused(app, "nothing", '{"x":1}') == "x: unknown field"


def test_missing_unknown_and_wrongly_typed_fields_name_the_field_and_type() -> None:
    app = App()

    @app.function
    def resize(url: str, width: int = 256, formats: list[str] = ["png"]) -> dict:
        return {"url": url, "width": width, "formats": formats}

    assert run(app, "resize", '{"url":"u"}') == {"url": "u", "width": 256, "formats": ["png"]}
    assert refused(app, "resize", '{"width":1}') == "url: missing required field (expected str)"
    assert refused(app, "resize", '{"url":"u","height":1}') == "height: unknown field"
    assert refused(app, "resize", '{"url":"u","width":"1"}') == "width: expected `int`, got `str`"
    assert refused(app, "resize", '{"url":"u","width":1.5}') == "width: expected `int`, got `float`"
    assert refused(app, "resize", '{"url":"u","formats":["a",2]}') == "formats[1]: expected `str`, got `int`"
    assert refused(app, "resize", '{"url":').startswith("malformed JSON")


def test_a_mutable_default_is_a_fresh_copy_each_call() -> None:
    app = App()

    @app.function
    def grow(items: list[int] = [1]) -> list[int]:
        items.append(2)
        return items

    assert run(app, "grow", "{}") == [1, 2]
    assert run(app, "grow", "{}") == [1, 2]


# ------------------------------------------------------- each family of types


def test_builtins_convert_as_json_allows() -> None:
    app = App()

    @app.function
    def f(i: int, x: float, s: str, b: bool, n: None, d: dict[str, int], t: tuple[int, str]) -> list:
        return [i, x, s, b, n, d, list(t)]

    assert run(app, "f", '{"i":1,"x":2,"s":"s","b":true,"n":null,"d":{"k":1},"t":[1,"a"]}') == [
        1, 2.0, "s", True, None, {"k": 1}, [1, "a"]
    ]  # fmt: skip
    assert refused(app, "f", '{"i":1,"x":2,"s":"s","b":1,"n":null,"d":{},"t":[1,"a"]}') == (
        "b: expected `bool`, got `int`"
    )
    assert refused(app, "f", '{"i":1,"x":2,"s":"s","b":true,"n":null,"d":{"k":"v"},"t":[1,"a"]}') == (
        "d[...]: expected `int`, got `str`"  # msgspec does not name dict keys
    )


def test_optional_and_literal() -> None:
    app = App()

    @app.function
    def f(mode: Literal["fit", "fill"], limit: Optional[int] = None, tag: str | None = None) -> list:
        return [mode, limit, tag]

    assert run(app, "f", '{"mode":"fit"}') == ["fit", None, None]
    assert run(app, "f", '{"mode":"fill","limit":3,"tag":null}') == ["fill", 3, None]
    assert refused(app, "f", '{"mode":"zoom"}') == "mode: invalid enum value 'zoom' (expected Literal['fit', 'fill'])"
    assert refused(app, "f", '{"mode":"fit","limit":"3"}') == "limit: expected `int | null`, got `str`"


@dataclasses.dataclass
class Size:
    width: int
    height: int = 1


class Point(TypedDict):
    x: int
    y: int


class Box(msgspec.Struct):
    w: float
    h: float


class Opaque:  # no type msgspec knows
    pass


Big = pydantic.create_model("Big", **{f"field_{i:04d}": (int, 0) for i in range(400)})  # type: ignore[call-overload]


class Thumb(pydantic.BaseModel):
    url: str
    width: int = 256


def test_dataclass_typeddict_and_struct_arguments_and_results() -> None:
    app = App()

    @app.function
    def f(size: Size, point: Point, box: Box) -> Size:
        assert isinstance(size, Size) and isinstance(point, dict) and isinstance(box, Box)
        return Size(size.width + point["x"], int(box.h))

    @app.function
    def g() -> Box:
        return Box(w=1.5, h=2)

    assert run(app, "f", '{"size":{"width":2},"point":{"x":1,"y":2},"box":{"w":1,"h":3}}') == {
        "width": 3, "height": 3
    }  # fmt: skip
    assert refused(app, "f", '{"size":{},"point":{"x":1,"y":2},"box":{"w":1,"h":3}}') == (
        "size.width: missing required field"
    )
    assert refused(app, "f", '{"size":{"width":2},"point":{"x":1},"box":{"w":1,"h":3}}') == (
        "point.y: missing required field"
    )
    assert refused(app, "f", '{"size":{"width":2},"point":{"x":1,"y":2},"box":{"w":"1","h":3}}') == (
        "box.w: expected `float`, got `str`"
    )
    assert run(app, "g", "") == {"w": 1.5, "h": 2.0}


def test_pydantic_models_when_pydantic_is_installed() -> None:
    app = App()

    @app.function
    def f(thumb: Thumb, more: list[Thumb] | None = None) -> Thumb:
        assert isinstance(thumb, Thumb)
        return Thumb(url=thumb.url + "!", width=thumb.width + len(more or []))

    assert run(app, "f", '{"thumb":{"url":"u"}}') == {"url": "u!", "width": 256}
    assert run(app, "f", '{"thumb":{"url":"u","width":1},"more":[{"url":"v"}]}') == {"url": "u!", "width": 2}
    assert refused(app, "f", '{"thumb":{"width":1}}') == "thumb.url: Field required"
    assert refused(app, "f", '{"thumb":{"url":"u"},"more":[{"url":1}]}') == (
        "more.0.url: Input should be a valid string"
    )
    schema = app.functions["f"].schemas()
    assert schema["input"]["properties"]["thumb"]["properties"]["url"]["type"] == "string"
    assert schema["output"]["title"] == "Thumb"


def test_generators_are_bound_alike() -> None:
    app = App()

    @app.function
    def count(n: int) -> Iterator[int]:
        yield from range(n)

    spec = app.functions["count"]
    assert spec.schemas()["output"] == {"type": "integer"}  # each item's
    gen = codec.invoke(spec, codec.Call(id=1, function="count", payload=b'{"n":3}'))
    assert list(gen) == [0, 1, 2]
    with pytest.raises(BadRequest, match="n: expected `int`, got `str`"):
        codec.invoke(spec, codec.Call(id=1, function="count", payload=b'{"n":"3"}'))


# ------------------------------------------------------------ what is refused


def test_signatures_the_binder_cannot_take_fail_at_registration() -> None:
    app = App()
    with pytest.raises(TypeError, match=r"'star'.*\*args and \*\*kwargs"):

        @app.function
        def star(*args: int) -> None: ...

    with pytest.raises(TypeError, match=r"'opaque': unsupported parameter type"):

        @app.function
        def opaque(x: Opaque) -> None: ...

    with pytest.raises(TypeError, match=r"'dangling': cannot resolve its annotations"):

        @app.function
        def dangling(x: "NoSuchType") -> None: ...  # noqa: F821


def test_return_values_are_encoded_by_msgspec_for_typed_functions_only() -> None:
    app = App()

    @app.function
    def typed() -> Any:
        return {"set": {1}, "nan": float("nan"), "size": Size(1)}

    @app.function
    def plain(payload):
        return {1, 2}

    @app.function
    def unencodable() -> Any:
        return Opaque()

    # msgspec writes a set as an array and NaN as null, as pydantic does.
    assert run(app, "typed", "") == {"set": [1], "nan": None, "size": {"width": 1, "height": 1}}
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        run(app, "plain", "")  # json, as always: JSON has no set
    with pytest.raises(TypeError, match="return value of 'unencodable' is not JSON-serialisable"):
        run(app, "unencodable", "")


# --------------------------------------------------------------- injection


class Context:  # stands for pyfleet.Context, which the call context defines
    pass


Context.__module__ = "pyfleet.context"


def test_parameters_annotated_with_pyfleet_context_are_injected_not_bound() -> None:
    assert is_injected(Context)
    app = App()

    @app.function
    def typed(n: int, ctx: Context) -> list:
        return [n, type(ctx).__name__]

    @app.function
    def whole(payload, ctx: Context) -> list:
        return [payload, type(ctx).__name__]

    made = []

    def inject(annotation: Any) -> Any:
        made.append(annotation)
        return annotation()

    assert run(app, "typed", '{"n":1}', inject) == [1, "Context"]
    assert run(app, "whole", "[1]", inject) == [[1], "Context"]
    assert made == [Context, Context]
    # The context is not a field of the body, nor of the schema.
    assert refused(app, "typed", '{"n":1,"ctx":{}}') == "ctx: unknown field"
    assert list(app.functions["typed"].schemas()["input"]["properties"]) == ["n"]
    assert app.functions["whole"].schemas()["input"] == {}


# ------------------------------------------------------------------ schemas


def test_schemas_of_a_typed_function() -> None:
    app = App()

    @app.function
    def resize(url: str, width: int = 256, formats: list[str] = ["png"], size: Size | None = None) -> Size:
        return Size(width, 1)

    @app.function(raw=True)
    def raw(payload: bytes) -> bytes:
        return payload

    s = app.functions["resize"].schemas()
    assert s["input"] == {
        "type": "object",
        "properties": {
            "url": {"type": "string"},
            "width": {"type": "integer", "default": 256},
            "formats": {"type": "array", "items": {"type": "string"}, "default": ["png"]},
            "size": {"anyOf": [{"$ref": "#/$defs/Size"}, {"type": "null"}], "default": None},
        },
        "additionalProperties": False,
        "required": ["url"],
        "$defs": {
            "Size": {
                "title": "Size",
                "type": "object",
                "properties": {"width": {"type": "integer"}, "height": {"type": "integer", "default": 1}},
                "required": ["width"],
            }
        },
    }
    assert s["output"]["$ref"] == "#/$defs/Size"
    assert app.functions["raw"].schemas() == {"input": None, "output": None}


def test_a_schema_over_the_limit_is_replaced_by_a_note() -> None:
    app = App()

    @app.function
    def big(b: Big) -> None: ...  # type: ignore[valid-type]


    s = app.functions["big"].schemas()["input"]
    assert list(s) == ["$comment"] and f"(limit {SCHEMA_LIMIT})" in s["$comment"]


def test_the_handshake_line_stays_under_the_nodes_line_limit(capsys: pytest.CaptureFixture[str]) -> None:
    from pyfleet import process

    app = App()
    # 30 functions with schemas near the 4 KiB limit: over the budget in all.
    for i in range(30):
        fields = {f"f{i}_{j:03d}": (int, 0) for j in range(65)}
        model = pydantic.create_model(f"M{i}", **fields)  # type: ignore[call-overload]

        def fn(m: Any) -> None: ...

        fn.__annotations__ = {"m": model, "return": None}
        app.function(name=f"fn{i}")(fn)
    process.announce_ready(app, 1, True)
    line = capsys.readouterr().out.strip()
    assert line.startswith("PYFLEET-READY ") and len(line.encode()) < 64 << 10
    functions = json.loads(line[len("PYFLEET-READY ") :])["functions"]
    assert [f["name"] for f in functions] == [f"fn{i}" for i in range(30)]
    with_schema = [f for f in functions if "input_schema" in f]
    assert 0 < len(with_schema) < 30  # the first ones, until the budget ran out
    assert with_schema == functions[: len(with_schema)]
    size = len(json.dumps(with_schema[0]["input_schema"], separators=(",", ":")))
    assert 3000 < size <= SCHEMA_LIMIT
