"""Typed functions for test/typed_test.go: parameters bound by name from a
JSON object and validated from their annotations."""

from dataclasses import dataclass
from typing import Literal

from pyfleet import App

app = App()


@dataclass
class Thumb:
    url: str
    width: int
    formats: list[str]


@app.function
def resize(url: str, width: int = 256, formats: list[str] = ["png"], fit: Literal["crop", "pad"] = "pad") -> Thumb:
    return Thumb(url=url, width=width, formats=formats)


@app.function
def echo(payload):
    return payload
