"""The app of the oversized-reply tests (test/hostile_input_test.go):
functions whose answer is as large as the caller asks."""

from __future__ import annotations

from typing import Any, Iterator

from pyfleet import App

app = App()


@app.function
def echo(payload: Any) -> Any:
    return payload


@app.function
def big(payload: dict[str, int]) -> str:
    """A string of payload["bytes"] bytes."""
    return "x" * payload["bytes"]


@app.function
def big_error(payload: dict[str, int]) -> None:
    """Raises with a message of payload["bytes"] bytes."""
    raise ValueError("x" * payload["bytes"])


@app.function
def big_chunk(payload: dict[str, int]) -> Iterator[str]:
    """Yields one small item, then one of payload["bytes"] bytes."""
    yield "small"
    yield "x" * payload["bytes"]
