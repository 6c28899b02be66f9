from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from pyfleet import App, BadRequest


def test_decorator_forms_and_kinds() -> None:
    app = App()

    @app.function
    def plain(payload: Any) -> Any:
        return payload

    @app.function(name="sum")
    async def add(payload: list[int]) -> int:
        return sum(payload)

    @app.function()
    def count(payload: Any) -> Iterator[int]:
        yield 1

    @app.function(raw=True)
    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        yield data

    specs = app.functions
    assert list(specs) == ["plain", "sum", "count", "chunks"]
    assert [(s.kind, s.raw, s.stream) for s in specs.values()] == [
        ("sync", False, False),
        ("async", False, False),
        ("gen", False, True),
        ("asyncgen", True, True),
    ]
    assert specs["sum"].fn is add and specs["sum"].name == "sum"
    # The decorator hands back the function itself.
    assert plain(3) == 3


def test_registry_is_read_only() -> None:
    app = App()
    with pytest.raises(TypeError):
        app.functions["x"] = None  # type: ignore[index]


@pytest.mark.parametrize("name", ["a.b", "a*", "a>", "a b", "tab\t", "", "new\nline"])
def test_bad_names(name: str) -> None:
    app = App()
    with pytest.raises(ValueError, match="bad function name"):
        app.function(name=name)(lambda p: p)


def test_lambda_needs_a_name() -> None:
    # "<lambda>" holds a '>', which NATS reads as a wildcard.
    with pytest.raises(ValueError, match="<lambda>"):
        App().function(lambda p: p)


def test_duplicate_names() -> None:
    app = App()

    @app.function
    def f(payload: Any) -> None: ...

    with pytest.raises(ValueError, match="already registered"):
        app.function(name="f")(lambda p: p)
    assert app.functions["f"].fn is f


def test_apps_are_independent() -> None:
    a, b = App(), App()
    a.function(name="x")(lambda p: p)
    b.function(name="x")(lambda p: p)
    assert list(a.functions) == list(b.functions) == ["x"]


def test_not_callable() -> None:
    with pytest.raises(TypeError):
        App().function(42)  # type: ignore[call-overload]


def test_bad_request_is_an_exception() -> None:
    assert issubclass(BadRequest, Exception)


def test_rate_limit_is_checked_at_registration() -> None:
    app = App()

    @app.function(rate_limit="100/s")
    def fast(payload: Any) -> Any:
        return payload

    @app.function(rate_limit="1.5 / m")
    def slow(payload: Any) -> Any:
        return payload

    assert app.functions["fast"].rate_limit == "100/s"
    assert app.functions["slow"].rate_limit == "1.5 / m"
    assert app.functions["slow"].raw is False
    for bad in ("100", "0/s", "-3/s", "fast", "10/d", "/s", 100):
        with pytest.raises(ValueError, match=r"function 'hurry': bad rate_limit .*such as \"100/s\""):
            app.function(rate_limit=bad, name="hurry")(lambda payload: payload)  # type: ignore[arg-type]
    assert "hurry" not in app.functions
